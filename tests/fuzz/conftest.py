"""The fuzz tests' terminal summary: how many examples each property ran (CI's log shows the counts)."""
import fuzzhelpers


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = fuzzhelpers.COUNTS
    if not counts:
        return
    terminalreporter.write_sep("-", f"fuzz examples (hypothesis profile {fuzzhelpers.PROFILE!r})")
    for test_id, n in sorted(counts.items()):
        ok, refused = fuzzhelpers.OUTCOMES[test_id, "ok"], fuzzhelpers.OUTCOMES[test_id, "refused"]
        terminalreporter.write_line(f"{n:7d}  {test_id}  (reader calls: {ok} read, {refused} refused with a "
                                    "named error)")
    terminalreporter.write_line(f"{sum(counts.values()):7d}  in all, over {len(counts)} properties")
