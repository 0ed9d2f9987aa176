"""The persistent feature store (issue 33 item 2): keyed entries of safetensors shards, resumed after a crash,
checked before use, memory-mapped when read, equal bit for bit to a one-shot extraction."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import ascood
from ascood.data import datasets as D
from ascood.scoring.scorers import SCORERS, extract_features, features_scores, get_scorer
from ascood.scoring.shardfiles import (ShardedArray, ShardError, clear_maps, encode_shard, open_maps,
                                       read_shard_header)
from ascood.scoring.store import FeatureStore, NotStorable, SplitKey, StoreError, StoreFeatureCache, split_key
from clihelpers import write_images
from scorerhelpers import ConvBody

HERE = os.path.dirname(os.path.abspath(__file__))
C = 4


def _Body():
    return ConvBody(24)


def _tensors(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    x = torch.randn(n, 3, 6, 6, generator=g)
    x[torch.arange(n), y % 3] += 1.5 * (y[:, None, None] + 1)  # class structure
    return x, y


def _model(seed=0):
    """A random conv body whose linear layer is least-squares fitted to the classes (SHE needs every class
    correctly classified somewhere)."""
    torch.manual_seed(seed)
    model = ascood.ASCOODNet(_Body(), C, input_mean=[0.0] * 3, input_std=[0.5] * 3).eval()
    x, y = _tensors(96)
    with torch.no_grad():
        a = model.standardize(model.features(x)).double()
        a = torch.cat([a, torch.ones(len(a), 1, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(a, 4.0 * nn.functional.one_hot(y, C).double()).solution
        model.fc.weight.copy_(sol[:-1].T)
        model.fc.bias.copy_(sol[-1])
    return model


def _loader(n=100, seed=0, bs=8):
    return DataLoader(TensorDataset(*_tensors(n, seed)), batch_size=bs)


class _Counter:
    """Counts the images every module forward of the process sees at its top-level module calls."""

    def __init__(self, model):
        self.images = 0
        model.backbone.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.images += args[0].shape[0]


def _equal(a, b):
    """Two records hold the same bytes (logits, features, labels)."""
    for name in ("logits", "features", "labels"):
        x, y = getattr(a, name), getattr(b, name)
        x = x.numpy() if torch.is_tensor(x) else np.asarray(x)
        y = y.numpy() if torch.is_tensor(y) else np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name


def _store(tmp_path, lines=None, **kw):
    return FeatureStore(tmp_path / "store", log=(lines.append if lines is not None else None), **kw)


# -- one-shot extraction, layout, reading ------------------------------------------------------------------
def test_store_equals_extract_features_bit_for_bit_and_is_read_without_the_model(tmp_path):
    model = _model()
    count = _Counter(model)
    loader = _loader(100, bs=8)
    ref = extract_features(model, loader)
    count.images = 0
    store = _store(tmp_path, shard_rows=16)  # 16 = 2 batches of 8: the batches are those of one pass
    cache = StoreFeatureCache(model, store)
    got = cache.get(loader)
    assert count.images == 100 and cache.extractions == 1 and cache.shards_extracted == 7
    assert isinstance(got.features, ShardedArray) and isinstance(got.logits, ShardedArray)
    assert got.batch_size == 8 and got.head is not None
    _equal(got, ref)
    assert cache.get(loader) is got  # the same loader: the same record
    # A second cache (a later command) reads the store: no forward at all.
    again = StoreFeatureCache(model, store)
    _equal(again.get(loader), ref)
    assert count.images == 100 and again.extractions == 0 and again.store_hits == 1
    # The layout: one key folder, its manifest and 7 safetensors shards that safetensors itself reads.
    (entry,) = os.listdir(tmp_path / "store")
    folder = tmp_path / "store" / entry
    names = sorted(os.listdir(folder))
    assert names == ["manifest.json"] + [f"shard-{i:05d}.safetensors" for i in range(7)]
    m = json.loads((folder / "manifest.json").read_text())
    assert m["complete"] and m["n"] == 100 and m["shard_rows"] == 16 and m["n_shards"] == 7
    assert m["arrays"] == {"logits": {"dtype": "float32", "shape": [100, C]},
                           "features": {"dtype": "float32", "shape": [100, 24]},
                           "labels": {"dtype": "int64", "shape": [100]}}
    assert [s["stop"] - s["start"] for s in m["shards"]] == [16] * 6 + [4]
    assert set(m["parts"]) == {"checkpoint", "files", "preprocessing", "layer", "features_dtype", "n", "version"}
    with safe_open(str(folder / "shard-00006.safetensors"), "np") as f:
        assert np.array_equal(f.get_tensor("features"), ref.features[96:].numpy())
        assert f.metadata()["start"] == "96" and f.metadata()["stop"] == "100"


@pytest.mark.parametrize("name", sorted(n for n in SCORERS if get_scorer(n).supports_features))
def test_every_feature_scorer_fits_and_scores_the_same_from_the_store(name, tmp_path):
    model = _model()
    kw = {"knn": {"K": 5}, "vim": {"dim": 8}, "nnguide": {"K": 5, "bank": "first", "alpha": 0.5},
          "relation": {"pow": 2}}.get(name, {})
    train, test = _loader(96, 0, bs=8), _loader(40, 1, bs=8)
    store = _store(tmp_path, shard_rows=24)
    a, b = get_scorer(name, **kw), get_scorer(name, **kw)
    # Scorers with record extras (AdaSCALE's perturbed features): the store keeps the clean arrays and the
    # cache adds the extras in RAM beside them, so both sides must give the same record.
    extras = a.record_extras()
    if a.needs_fit:
        a.chunk_rows = b.chunk_rows = 10  # a chunk crosses shard boundaries
        a.fit_features(extract_features(model, train, extras=extras))
        b.fit_features(StoreFeatureCache(model, store).get(train, extras))
    s_ram = features_scores(a, extract_features(model, test, extras=extras), rows=7)[1]
    s_store = features_scores(b, StoreFeatureCache(model, store).get(test, extras), rows=7)[1]
    assert torch.equal(s_store, s_ram)


def test_reading_a_chunk_maps_only_its_shard_and_take_slice_index_rows(tmp_path):
    model = _model()
    feats = StoreFeatureCache(model, _store(tmp_path, shard_rows=10)).get(_loader(55))
    ref = extract_features(model, _loader(55))
    clear_maps()
    rows = feats.feature_rows(23, 27)  # inside shard 2
    assert torch.equal(rows, ref.features[23:27])
    assert [os.path.basename(p) for p in open_maps()] == ["shard-00002.safetensors"]
    assert torch.equal(feats.feature_rows(8, 33), ref.features[8:33])  # crosses 4 shards
    assert len(open_maps()) == 4
    idx = torch.tensor([54, 0, 31, 9, 31])
    _equal(feats.take(idx), ref.take(idx))
    part = feats.slice(21)
    assert isinstance(part.features, ShardedArray) and len(part) == 21
    assert np.array_equal(np.asarray(part.logits), ref.logits[:21].numpy())
    assert np.array_equal(feats.features[-1], ref.features[-1].numpy())
    assert np.array_equal(feats.features[np.arange(55) % 2 == 1], ref.features[1::2].numpy())


def test_float16_features_are_half_the_size_within_float16_rounding(tmp_path):
    model = _model()
    loader = _loader(64)
    ref = extract_features(model, loader)
    s32, s16 = _store(tmp_path / "a", shard_rows=32), _store(tmp_path / "b", shard_rows=32, features_dtype="float16")
    f32, f16 = StoreFeatureCache(model, s32).get(loader), StoreFeatureCache(model, s16).get(loader)
    assert f16.features.dtype == np.float16 and f16.logits.dtype == np.float32
    assert np.array_equal(np.asarray(f16.logits), ref.logits.numpy())
    h32, h16 = ref.features.numpy(), np.asarray(f16.features).astype(np.float32)
    # Round to nearest float16: relative error <= 2^-11 for values in float16's normal range (>= 2^-14).
    normal = np.abs(h32) >= 2.0 ** -14
    assert np.all(np.abs(h16 - h32)[normal] <= 2.0 ** -11 * np.abs(h32[normal]))
    assert np.all(np.abs(h16 - h32)[~normal] <= 2.0 ** -25)
    # The features array takes half the bytes; logits and labels the same.
    size = {}
    for store in (s32, s16):
        (entry,) = os.listdir(store.root)
        hdr = read_shard_header(os.path.join(store.root, entry, "shard-00000.safetensors"))
        size[store.features_dtype] = {k: int(np.prod(s)) * np.dtype(d).itemsize for k, (d, s, _) in hdr.arrays.items()}
    assert size["float16"]["features"] * 2 == size["float32"]["features"] == 32 * 24 * 4
    assert size["float16"]["logits"] == size["float32"]["logits"]
    assert f32.features.dtype == np.float32 and s16.key(model, loader).digest != s32.key(model, loader).digest


# -- resume, corruption, tampering ---------------------------------------------------------------------------
def test_an_extraction_stopped_after_shard_k_resumes_with_the_missing_shards_only(tmp_path, monkeypatch):
    from ascood.scoring import store as S

    model = _model()
    count = _Counter(model)
    loader = _loader(100, bs=8)
    one_shot = StoreFeatureCache(model, _store(tmp_path / "ref", shard_rows=16)).get(loader)
    real = S.SplitEntry.write_shard
    written = []

    def failing(self, i, arrays):
        if len(written) == 3:
            raise KeyboardInterrupt("stopped")
        written.append(i)
        return real(self, i, arrays)

    monkeypatch.setattr(S.SplitEntry, "write_shard", failing)
    store = _store(tmp_path, shard_rows=16)
    with pytest.raises(KeyboardInterrupt):
        StoreFeatureCache(model, store).get(loader)
    monkeypatch.setattr(S.SplitEntry, "write_shard", real)
    entry = store.split(store.key(model, loader))
    assert entry.missing_shards() == [3, 4, 5, 6] and not entry.is_complete()
    count.images = 0
    cache = StoreFeatureCache(model, store)
    _equal(cache.get(loader), one_shot)
    assert count.images == 100 - 48 and cache.shards_extracted == 4


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{tests!r}, {here!r}]
    from test_feature_store import _model, _loader
    from ascood.scoring import store as S
    real, done = S.SplitEntry.write_shard, []
    def write_then_die(self, i, arrays):
        out = real(self, i, arrays)
        done.append(i)
        if len(done) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    S.SplitEntry.write_shard = write_then_die
    S.StoreFeatureCache(_model(), S.FeatureStore({root!r}, shard_rows=16)).get(_loader(100, bs=8))
""")


def test_a_process_killed_mid_extraction_resumes_and_equals_one_shot(tmp_path):
    root = str(tmp_path / "store")
    code = KILLER.format(tests=os.path.dirname(HERE), here=HERE, root=root)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(HERE)))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    model = _model()
    loader = _loader(100, bs=8)
    store = FeatureStore(root, shard_rows=16)
    entry = store.split(store.key(model, loader))
    assert entry.missing_shards() == [2, 3, 4, 5, 6]
    count = _Counter(model)
    cache = StoreFeatureCache(model, store)
    _equal(cache.get(loader), extract_features(_model(), loader))
    assert count.images == 100 - 32 and cache.shards_extracted == 5


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("where", ["data", "header", "truncated"])
def test_a_damaged_shard_is_made_again_and_said(tmp_path, where):
    model = _model()
    loader = _loader(64)
    lines = []
    store = _store(tmp_path, lines, shard_rows=16)
    ref = StoreFeatureCache(model, store).get(loader)
    ref = type(ref)(torch.from_numpy(np.asarray(ref.logits)), torch.from_numpy(np.asarray(ref.features)),
                    ref.labels)
    (entry,) = os.listdir(store.root)
    shard = os.path.join(store.root, entry, "shard-00001.safetensors")
    hdr = read_shard_header(shard)
    if where == "data":
        _flip(shard, hdr.size - 5)
    elif where == "header":
        _flip(shard, 8 + 20)  # inside the JSON header
    else:
        with open(shard, "r+b") as f:
            f.truncate(hdr.size - 4)
    from ascood.scoring import shardfiles
    shardfiles._VERIFIED.clear()  # a new process: nothing is known verified
    model2 = _model()
    count = _Counter(model2)
    cache = StoreFeatureCache(model2, store)
    _equal(cache.get(loader), ref)
    assert count.images == 16 and cache.shards_extracted == 1
    said = [line for line in lines if "shard 1" in line]
    assert len(said) == 1 and "not usable" in said[0] and "making it again" in said[0]


def test_a_tampered_manifest_is_rebuilt_and_its_claims_are_not_used(tmp_path):
    model = _model()
    loader = _loader(64)
    lines = []
    store = _store(tmp_path, lines, shard_rows=16)
    ref = extract_features(model, loader)
    StoreFeatureCache(model, store).get(loader)
    (entry,) = os.listdir(store.root)
    mpath = os.path.join(store.root, entry, "manifest.json")
    m = json.loads(open(mpath).read())
    m["n"] = 48  # claims fewer rows
    m["shards"] = m["shards"][:3]
    with open(mpath, "w") as f:
        json.dump(m, f)
    count = _Counter(model)
    cache = StoreFeatureCache(model, store)
    _equal(cache.get(loader), ref)
    assert count.images == 0  # the shards still verify against the key: kept
    assert any("manifest.json says n = 48" in line and "rebuilding" in line for line in lines), lines
    assert json.loads(open(mpath).read())["n"] == 64
    # Not JSON at all: rebuilt too; a shard swapped in from another key is refused by its own metadata.
    open(mpath, "w").write("{not json")
    other = _store(tmp_path / "other", shard_rows=16)
    StoreFeatureCache(model, other).get(_loader(64, seed=5))
    (oentry,) = os.listdir(other.root)
    os.replace(os.path.join(other.root, oentry, "shard-00002.safetensors"),
               os.path.join(store.root, entry, "shard-00002.safetensors"))
    lines.clear()
    count.images = 0
    _equal(StoreFeatureCache(model, store).get(loader), ref)
    assert count.images == 16
    assert any("not valid JSON" in line for line in lines) and any("metadata key" in line for line in lines)


def test_foreign_files_in_a_key_folder_are_refused_the_root_may_hold_anything(tmp_path):
    model = _model()
    loader = _loader(20)
    store = _store(tmp_path, shard_rows=8)
    os.makedirs(store.root)
    (tmp_path / "store" / "notes.txt").write_text("mine")
    StoreFeatureCache(model, store).get(loader)
    (entry,) = [n for n in os.listdir(store.root) if n != "notes.txt"]
    (tmp_path / "store" / entry / "keep.me").write_text("mine")
    with pytest.raises(StoreError, match="keep.me.*did not write"):
        StoreFeatureCache(model, store).get(loader)
    assert (tmp_path / "store" / entry / "keep.me").read_text() == "mine"
    assert (tmp_path / "store" / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        FeatureStore(tmp_path / "file")


def test_read_shard_header_refuses_malformed_files(tmp_path):
    good, _ = encode_shard({"logits": np.ones((2, 3), np.float32)}, {"format": "x"})
    cases = {
        "short": b"\x01\x00",
        "huge length": (10 ** 9).to_bytes(8, "little") + b"{}",
        "not json": (4).to_bytes(8, "little") + b"{abc",
        "dup keys": _raw('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                         '"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 4),
        "bad dtype": _raw('{"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}', 8),
        "size mismatch": _raw('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', 4),
        "gap": _raw('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', 8),
        "trailing": _raw('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 8),
        "pickle-ish": _raw('{"a":{"dtype":"O","shape":[1],"data_offsets":[0,4]}}', 4),
    }
    for name, blob in cases.items():
        p = tmp_path / name.replace(" ", "_")
        p.write_bytes(blob)
        with pytest.raises(ShardError):
            read_shard_header(p)
    p = tmp_path / "good"
    p.write_bytes(good)
    assert read_shard_header(p).arrays["logits"][:2] == ("float32", (2, 3))


def _raw(header: str, data_bytes: int) -> bytes:
    h = header.encode()
    return len(h).to_bytes(8, "little") + h + b"\0" * data_bytes


# -- keys -----------------------------------------------------------------------------------------------------
def _folder_loader(root, mean=(0.5, 0.5, 0.5), bs=4):
    tf = D.build_transforms(8, list(mean), [0.25] * 3, train=False)
    return DataLoader(D.dataset_from_path(str(root), tf, train=False), batch_size=bs)


def test_a_changed_checkpoint_file_list_or_preprocessing_extracts_again_and_says_what(tmp_path):
    data = tmp_path / "ood"
    write_images(data, 6, (200, 40, 40))
    lines = []
    store = _store(tmp_path, lines, shard_rows=4)
    model = _model()
    count = _Counter(model)
    ckpt = tmp_path / "a.pt"
    torch.save(model.state_dict(), ckpt)
    StoreFeatureCache(model, store, checkpoint=ckpt).get(_folder_loader(data))
    assert count.images == 6 and not lines[:-1]
    StoreFeatureCache(model, store, checkpoint=ckpt).get(_folder_loader(data))
    assert count.images == 6
    # Other weights in another file: extracted again, said.
    other = _model(seed=1)
    torch.save(other.state_dict(), tmp_path / "b.pt")
    n_other = _Counter(other)
    StoreFeatureCache(other, store, checkpoint=tmp_path / "b.pt").get(_folder_loader(data))
    assert n_other.images == 6
    assert any(f"{os.path.realpath(data)}: checkpoint changed" in line for line in lines), lines
    # An image added: the file list changed.
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(data / "extra.png")
    lines.clear()
    StoreFeatureCache(model, store, checkpoint=ckpt).get(_folder_loader(data))
    assert count.images == 6 + 7
    assert any("file list, number of images changed" in line for line in lines), lines  # vs the closest key
    # Another normalisation: the preprocessing changed.
    lines.clear()
    StoreFeatureCache(model, store, checkpoint=ckpt).get(_folder_loader(data, mean=(0.4, 0.5, 0.5)))
    assert count.images == 6 + 7 + 7 and any("preprocessing changed" in line for line in lines), lines
    # The same bytes written again (a touched file): the mtime is keyed, so it is extracted again.
    key = split_key(model, _folder_loader(data), checkpoint=ckpt)
    os.utime(data / "0.png", ns=(1, 1))
    assert split_key(model, _folder_loader(data), checkpoint=ckpt).digest != key.digest


def test_keys_of_subsets_wrappers_and_unkeyable_data(tmp_path):
    model = _model()
    x, y = _tensors(30)
    ds = TensorDataset(x, y)
    k_all = split_key(model, DataLoader(ds, batch_size=4))
    k_sub = split_key(model, DataLoader(Subset(ds, list(range(10))), batch_size=4))
    k_sub2 = split_key(model, DataLoader(Subset(ds, list(range(1, 11))), batch_size=4))
    assert len({k_all.digest, k_sub.digest, k_sub2.digest}) == 3 and k_sub.n == 10 and k_sub.label != k_sub2.label
    # The batch size is not keyed; the model's weights are (state dict, without a checkpoint file).
    assert split_key(model, DataLoader(ds, batch_size=7)).digest == k_all.digest
    assert split_key(_model(seed=2), DataLoader(ds, batch_size=4)).changes(k_all.parts()) == ["checkpoint"]
    with pytest.raises(NotStorable, match="in order"):
        split_key(model, DataLoader(ds, batch_size=4, shuffle=True))

    class Opaque(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return x[i], 0

    with pytest.raises(NotStorable, match="Opaque"):
        split_key(model, Opaque())
    lines = []
    cache = StoreFeatureCache(model, _store(tmp_path, lines))
    feats = cache.get(DataLoader(ds, batch_size=4, shuffle=True))  # extracted as before, in RAM
    assert torch.is_tensor(feats.features) and cache.extractions == 1
    assert len(lines) == 1 and "not used for this split" in lines[0]
    with pytest.raises(ValueError, match="features_dtype"):
        SplitKey("c", "f", "p", "l", "float64", 3)


def test_concurrent_writers_of_one_split_each_write_their_shards(tmp_path):
    """Two writers (ranks) on one key: each extracts every other missing shard; whoever finalizes last sees
    the split complete; the result equals one process's bit for bit."""
    model = _model()
    loader = _loader(100, bs=8)
    store = _store(tmp_path, shard_rows=16)
    key = store.key(model, loader)
    a, b = store.split(key), store.split(key)
    todo = a.missing_shards()
    assert a.extract(model, loader, todo[0::2]) == [0, 2, 4, 6]
    assert not a.finalize() and a.missing_shards() == [1, 3, 5]
    assert b.extract(model, loader, todo[1::2]) == [1, 3, 5]
    assert b.finalize() and a.finalize()
    one = _store(tmp_path / "one", shard_rows=16)
    _equal(a.open(), StoreFeatureCache(model, one).get(loader))


def test_a_lost_manifest_is_rebuilt_with_its_shards_layout_and_stale_temporaries_go(tmp_path):
    model = _model()
    loader = _loader(40)
    lines = []
    StoreFeatureCache(model, _store(tmp_path, shard_rows=16)).get(loader)
    (entry,) = os.listdir(tmp_path / "store")
    folder = tmp_path / "store" / entry
    os.unlink(folder / "manifest.json")
    stale, fresh = folder / "shard-00001.safetensors.ascood.abcd1234.tmp", folder / "manifest.json.ascood.zz99yy88.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"being written")
    os.utime(stale, (1, 1))
    ref = extract_features(model, loader)
    count = _Counter(model)
    store = _store(tmp_path, lines)  # another shard size asked: the entry keeps the one its shards have
    _equal(StoreFeatureCache(model, store).get(loader), ref)
    assert count.images == 0 and any("manifest.json is missing: rebuilding" in line for line in lines), lines
    assert json.loads((folder / "manifest.json").read_text())["shard_rows"] == 16
    assert not stale.exists() and fresh.exists()  # a live writer's temporary is left alone


def test_float16_overflow_is_refused_with_the_fix(tmp_path):
    store = _store(tmp_path, shard_rows=4, features_dtype="float16")
    entry = store.split(SplitKey("state:x", "f", "p", "l", "float16", 4, label="big"))
    big = np.full((4, 3), 7e4, np.float32)
    with pytest.raises(ValueError, match="exceeds float16's range.*float32"):
        entry.write_shard(0, {"logits": np.zeros((4, 2), np.float32), "features": big})
    assert entry.missing_shards() == [0]


WRITER = textwrap.dedent("""
    import sys
    sys.path[:0] = [{tests!r}, {here!r}]
    from test_feature_store import _model, _loader
    from ascood.scoring.store import FeatureStore
    model, loader = _model(), _loader(100, bs=8)
    store = FeatureStore({root!r}, shard_rows=16, log=lambda line: None)
    entry = store.split(store.key(model, loader))
    print(entry.extract(model, loader, list(range({rank}, entry.n_shards, 2))))
""")


def test_two_processes_write_disjoint_shards_of_one_split_at_once(tmp_path):
    """Two processes (as two ranks) create the same entry and write every other shard concurrently; the split
    is then complete and equal to one process's extraction bit for bit."""
    root = str(tmp_path / "store")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(HERE)))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER.format(tests=os.path.dirname(HERE), here=HERE, root=root,
                                                                     rank=r)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o[0].strip() for o in outs] == ["[0, 2, 4, 6]", "[1, 3, 5]"]
    model, loader = _model(), _loader(100, bs=8)
    store = FeatureStore(root, shard_rows=16)
    entry = store.split(store.key(model, loader))
    assert entry.missing_shards() == [] and entry.finalize()
    assert sorted(os.listdir(entry.path)) == ["manifest.json"] + [f"shard-{i:05d}.safetensors" for i in range(7)]
    _equal(entry.open(), extract_features(model, loader))


def test_every_single_byte_damage_to_a_shard_header_is_refused(tmp_path):
    """The header is not under the data's sha256: each of its bytes flipped (one at a time) must still be
    refused by verify_shard (a damaged key name once read as a default: a flaky miss, depending on the
    order safetensors wrote the metadata keys in)."""
    from ascood.scoring import shardfiles
    from ascood.scoring.shardfiles import verify_shard

    store = _store(tmp_path, shard_rows=16)
    StoreFeatureCache(_model(), store).get(_loader(32))
    (entry,) = os.listdir(store.root)
    shard = os.path.join(store.root, entry, "shard-00001.safetensors")
    hdr = read_shard_header(shard)
    m = hdr.metadata
    kw = dict(key=m["key"], index=1, start=16, stop=32,
              dtypes={name: dtype for name, (dtype, _, _) in hdr.arrays.items()})
    original = open(shard, "rb").read()
    header_end = 8 + int.from_bytes(original[:8], "little")
    missed = []
    for offset in range(8, header_end):
        damaged = bytearray(original)
        damaged[offset] ^= 0x01
        with open(shard, "wb") as f:
            f.write(damaged)
        shardfiles._VERIFIED.clear()
        try:
            verify_shard(shard, **kw)
        except ShardError:
            continue
        missed.append((offset, chr(original[offset])))
    assert not missed, f"header bytes whose damage was not refused: {missed[:10]}"
    with open(shard, "wb") as f:
        f.write(original)
    shardfiles._VERIFIED.clear()
    verify_shard(shard, **kw)  # the undamaged file passes
