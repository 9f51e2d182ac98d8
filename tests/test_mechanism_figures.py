"""The mechanism figures (tuned vs logit lens, branch value, patching) draw the table's numbers."""

from __future__ import annotations

import numpy as np
import pytest

QUIET = dict(progress=False, log=lambda *_: None, n_boot=50)


@pytest.fixture(scope="module")
def mech(tiny_run, tmp_path_factory):
    from probes.runner import run

    ckpts = [str(tiny_run / "checkpoints" / n) for n in ("sft-step000000", "sft-step000020")]
    out = tmp_path_factory.mktemp("mech") / "results"
    return run(ckpts, out=out, samples=2, forcing=2, patching=True, **QUIET)


def _lines(fig):
    return {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines()}


def test_lens_kl_draws_both_lenses_from_the_table(mech):
    from analysis import figures as F

    fig = F.lens_kl(mech)
    lines = _lines(fig)
    for name, label in (("sft-step000000", "base"), ("sft-step000020", "SFT step 20")):
        for metric, what in (("lens_kl_final", "logit"), ("tuned_lens_kl_final", "tuned")):
            want = mech[(mech.metric == metric) & (mech.checkpoint == name) & (mech.kind == "all")].sort_values("layer")
            np.testing.assert_allclose(lines[f"{label}, {what} lens"].get_ydata(), want.value, atol=1e-12)
    last = mech[(mech.metric == "tuned_lens_kl_final") & (mech.kind == "all")]
    assert (last[last.layer == last.layer.max()].value.abs() < 1e-5).all()  # the last layer is the model


def test_branch_value_and_patching_figures(mech):
    from analysis import figures as F

    fig = F.branch_values(mech)
    bars = [p.get_height() for p in fig.axes[0].patches]
    want = []
    for name in ("sft-step000000", "sft-step000020"):
        for metric in ("branch_value_preferred", "branch_value_valid"):
            sub = mech[(mech.metric == metric) & (mech.checkpoint == name)].set_index("kind")
            want += [sub.value.get(k, np.nan) for k in ("indecipherable", "decipherable", "multi-valid", "all")]
    np.testing.assert_allclose(bars, want, atol=1e-12)
    fig = F.patching_recovery(mech)
    line = _lines(fig)["all kinds"]
    rec = mech[(mech.metric == "patch_recovered_share") & (mech.kind == "all")].sort_values("layer")
    np.testing.assert_allclose(line.get_ydata(), rec.value, atol=1e-12)
    assert set(rec.checkpoint) == {"sft-step000020"}  # the base is not patched with itself
