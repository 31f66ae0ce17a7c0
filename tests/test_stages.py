from vild_d2.pipeline.stages import StageRunner


def test_stage_skips_when_key_and_outputs_match(tmp_path):
    calls = []
    out = tmp_path / "o.txt"

    def work():
        calls.append(1)
        out.write_text("x")
        return {"n": len(calls)}

    assert StageRunner(str(tmp_path)).run("s", {"a": 1}, work, outputs=[str(out)]) == {"n": 1}
    assert StageRunner(str(tmp_path)).run("s", {"a": 1}, work, outputs=[str(out)]) == {"n": 1}
    assert len(calls) == 1
    out.unlink()  # a missing output reruns the stage
    StageRunner(str(tmp_path)).run("s", {"a": 1}, work, outputs=[str(out)])
    assert len(calls) == 2


def test_changed_inputs_clean_stale_outputs_but_an_interrupted_run_resumes(tmp_path):
    cleaned = []

    def interrupted():
        raise KeyboardInterrupt

    runner = StageRunner(str(tmp_path))
    try:
        runner.run("train", {"lr": 1}, interrupted, clean=lambda: cleaned.append("lr1"))
    except KeyboardInterrupt:
        pass
    # same key again: resume, no cleaning
    StageRunner(str(tmp_path)).run("train", {"lr": 1}, lambda: {}, clean=lambda: cleaned.append("x"))
    assert cleaned == []
    # other key: the old outputs are stale
    StageRunner(str(tmp_path)).run("train", {"lr": 2}, lambda: {}, clean=lambda: cleaned.append("y"))
    assert cleaned == ["y"]


def test_upstream_change_invalidates_downstream(tmp_path):
    calls = []
    for key in (1, 1, 2):
        r = StageRunner(str(tmp_path))
        r.run("up", {"k": key}, lambda: {})
        r.run("down", {}, lambda: calls.append(1), after=["up"])
    assert len(calls) == 2


def test_parallel_stages_run_at_the_same_time_and_keep_their_order(tmp_path):
    import threading

    barrier = threading.Barrier(2, timeout=10)  # passes only when both stages run at once

    def stage(name):
        def work():
            barrier.wait()
            return {"name": name}
        return dict(name=name, key={}, fn=work)

    runner = StageRunner(str(tmp_path), log=lambda m: None)
    results = runner.run_parallel([stage("a"), stage("b")], workers=2)
    assert results == [{"name": "a"}, {"name": "b"}]
    assert set(runner.digests) == {"a", "b"}
    # a rerun skips both, without waiting on each other
    assert StageRunner(str(tmp_path), log=lambda m: None).run_parallel(
        [dict(name="a", key={}, fn=lambda: 1 / 0), dict(name="b", key={}, fn=lambda: 1 / 0)], 2
    ) == [{"name": "a"}, {"name": "b"}]


def test_a_failed_parallel_stage_is_raised_after_the_others_finish(tmp_path):
    import pytest

    done = []

    def fail():
        raise RuntimeError("stage b failed")

    runner = StageRunner(str(tmp_path), log=lambda m: None)
    with pytest.raises(RuntimeError, match="stage b failed"):
        runner.run_parallel([dict(name="a", key={}, fn=lambda: done.append(1) or {"ok": 1}),
                             dict(name="b", key={}, fn=fail)], workers=2)
    assert done == [1] and "a" in runner.digests and "b" not in runner.digests
