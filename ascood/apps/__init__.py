"""ascood.apps: the commands people run, one module each.

``ascood train`` (:mod:`.train`), ``eval`` (:mod:`.evaluate`), ``reproduce``
(:mod:`.reproduce`), ``demo`` (:mod:`.demo`), ``bench`` and ``doctor``
(:mod:`.tools`), dispatched by :mod:`.main`; the paper's presets
(:mod:`.presets`); argument types and checks shared by the commands
(:mod:`.argtypes`, :mod:`.checks`).

Layer rule: the top layer; may import every other layer, and nothing below imports it.
"""
