"""`sla-tl quality` on the CPU: the clips, the DiT, the arms, and a smoke run of the protocol
(every arm runs, the outputs are well-formed; not a timed test)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from sla_tl import cli as sla_cli
from sla_tl.benchmarks.quality import cli, protocol, results
from sla_tl.benchmarks.quality.arms import ARM_NAMES, arm_named, attention_factory
from sla_tl.benchmarks.quality.dit import (
    DiTConfig,
    VideoDiT,
    apply_rope,
    patchify,
    rope_tables,
    unpatchify,
)
from sla_tl.benchmarks.quality.sizes import SIZES
from sla_tl.benchmarks.quality.videos import make_clips

from .helpers import relative_error

SMOKE = SIZES["smoke"]


def _clips(seed: int, count: int = 3, frames: int = 6, size: int = 16) -> torch.Tensor:
    return make_clips(count, frames, size, 2, torch.Generator().manual_seed(seed))


def test_clips_come_from_the_seed_and_have_space_time_structure():
    clips = _clips(5)
    assert clips.shape == (3, 6, 3, 16, 16) and clips.dtype == torch.float32
    assert clips.abs().max() <= 1.0 and clips.std() > 0.2
    assert torch.equal(clips, _clips(5))
    assert relative_error(clips, _clips(6)) > 0.5
    # Things move: frames differ, and frames further apart differ more.
    step = (clips[:, 1:] - clips[:, :-1]).square().mean()
    far = (clips[:, 5:] - clips[:, :1]).square().mean()
    assert 0 < step < far / 2


def test_clips_reject_bad_sizes():
    with pytest.raises(ValueError, match=r"count, frames and size must be positive"):
        make_clips(1, 0, 16, 2, torch.Generator())


def test_patchify_round_trip_and_token_order():
    config = DiTConfig(frames=3, size=8, patch=4, width=64, heads=1, depth=1)
    clips = torch.randn(2, 3, 3, 8, 8)
    tokens = patchify(clips, 4)
    assert tokens.shape == (2, 12, 48)
    assert torch.equal(unpatchify(tokens, config), clips)
    # Token 5 is frame 1, row 0, column 1: its first channel's top-left pixel.
    assert tokens[0, 5, 0] == clips[0, 1, 0, 0, 4]


def test_rope_scores_depend_on_relative_position_only(generator):
    grid = (4, 5, 6)
    cos, sin = rope_tables(grid, 64)
    a, b = torch.randn(2, 64, generator=generator)

    def score(first: tuple, second: tuple) -> float:
        i = (first[0] * 5 + first[1]) * 6 + first[2]
        j = (second[0] * 5 + second[1]) * 6 + second[2]
        x = apply_rope(a.view(1, 1, 1, 64), cos[i:i + 1], sin[i:i + 1])
        y = apply_rope(b.view(1, 1, 1, 64), cos[j:j + 1], sin[j:j + 1])
        return (x * y).sum().item()

    assert score((0, 1, 2), (2, 3, 1)) == pytest.approx(score((1, 2, 4), (3, 4, 3)), rel=1e-5)
    assert score((0, 1, 2), (2, 3, 1)) != pytest.approx(score((0, 1, 2), (3, 3, 1)), rel=1e-3)
    # Rotations keep norms.
    rotated = apply_rope(a.expand(1, 1, 120, 64), cos, sin)
    assert torch.allclose(rotated.norm(dim=-1), a.norm().expand(1, 1, 120), rtol=1e-5)


def test_sla_arm_with_every_block_critical_matches_dense(generator):
    config = DiTConfig(frames=2, size=16, patch=4, width=128, heads=2, depth=2)
    torch.manual_seed(0)
    dense = VideoDiT(config, attention_factory(arm_named("dense"), 0.05, 16, 16))
    for p in dense.parameters():  # a model that does something (DiT starts as zero)
        torch.nn.init.normal_(p, std=0.05)
    recorder = protocol._CoreRecorder(attention_factory(arm_named("sla"), 1.0, 16, 16))
    sla = VideoDiT(config, recorder)
    protocol.load_pretrained(sla, dense.state_dict(), recorder.cores)
    noisy, t = torch.randn(2, 2, 3, 16, 16, generator=generator), torch.rand(2, generator=generator)
    expected = dense(noisy, t)
    assert relative_error(sla(noisy, t), expected) < 2e-2
    with torch.no_grad():
        recorder.cores[0].sla.proj_l.bias.fill_(1.0)
    assert relative_error(sla(noisy, t), expected) > 5e-2


def test_checkpoint_that_does_not_fit_is_refused():
    config = DiTConfig(frames=2, size=16, patch=4, width=64, heads=1, depth=1)
    recorder = protocol._CoreRecorder(attention_factory(arm_named("sla"), 0.5, 16, 16))
    model = VideoDiT(config, recorder)
    checkpoint = VideoDiT(config, attention_factory(arm_named("dense"), 0.5, 16, 16)).state_dict()
    del checkpoint["embed.weight"]
    with pytest.raises(ValueError, match=r"missing \['embed.weight'\]"):
        protocol.load_pretrained(model, checkpoint, recorder.cores)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _error_line(capsys, *argv: str) -> str:
    status, _, err = _run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("sla-tl quality: error: "), err
    return lines[0]


def test_smoke_run_of_every_arm_writes_a_well_formed_result(tmp_path, capsys):
    parts = []
    for seed in (0, 1):
        part = tmp_path / f"seed{seed}.json"
        status, out, _ = _run(capsys, "--size", "smoke", "--seeds", str(seed), "--quiet",
                              "--out", str(part))
        assert status == 0 and f"wrote {part}" in out
        parts.append(str(part))
    plot = tmp_path / "quality.png"
    merged = tmp_path / "merged.json"
    status, out, _ = _run(capsys, "--from", *parts, "--out", str(merged), "--plot", str(plot))
    assert status == 0
    doc = json.loads(merged.read_text())
    assert results.validate(doc) == []
    assert doc["settings"]["seeds"] == [0, 1] and doc["settings"]["task"] == "video_dit"
    assert doc["environment"]["torch"] == torch.__version__
    steps = SMOKE.protocol.finetune_steps
    assert sorted((r["seed"], r["arm"]) for r in doc["runs"]) == sorted(
        (s, a) for s in (0, 1) for a in ARM_NAMES)
    for run in doc["runs"]:
        assert len(run["train_curve"]) == steps and run["step_ms"] > 0
        assert [s for s, _ in run["heldout_curve"]] == list(range(1, steps + 1))
        assert run["heldout_loss"] == run["heldout_curve"][-1][1] > 0
        assert len(run["attention_error_layers"]) == SMOKE.task.model.depth
    by_arm = {r["arm"]: r for r in doc["runs"] if r["seed"] == 0}
    assert by_arm["dense"]["heldout_loss_vs_dense"] == 0.0
    # Dense attention's own error is bfloat16 rounding; the sparse arms' is the dropped mass.
    assert by_arm["dense"]["attention_error"] < 1e-2 < by_arm["sla"]["attention_error_start"]
    # What each arm trains: the linear branch's projection, the gate, or neither.
    d, depth = SMOKE.task.model.head_dim, SMOKE.task.model.depth
    dense_count = by_arm["dense"]["trained_parameters"]
    assert by_arm["sparse_only"]["trained_parameters"] == dense_count
    assert by_arm["sla"]["trained_parameters"] == dense_count + depth * (d * d + d)
    assert by_arm["salad"]["trained_parameters"] == dense_count + depth * (d * d + d + d + 1)
    assert [row["arm"] for row in doc["summary"]] == list(ARM_NAMES)
    assert all(row["heldout_loss_vs_dense_sd"] is not None for row in doc["summary"])
    for arm in ARM_NAMES:
        assert f"\n{arm} " in out
    assert "target: sla within 2% of dense" in out
    assert "target: sparse_only measurably worse" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merging_the_same_seed_twice_is_refused(tmp_path, capsys):
    part = tmp_path / "a.json"
    assert _run(capsys, "--size", "smoke", "--arms", "dense,sla", "--quiet", "--out",
                str(part))[0] == 0
    line = _error_line(capsys, "--from", str(part), str(part))
    assert "seeds [0] appear in more than one result" in line


def test_damaged_results_are_reported_by_path(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert str(broken) in _error_line(capsys, "--from", str(broken))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"kind": "sla-tl quality", "schema_version": 1}))
    line = _error_line(capsys, "--from", str(wrong))
    assert f"{wrong} is not a quality result" in line and "'runs' is missing" in line
    assert "no-such.json" in _error_line(capsys, "--from", str(tmp_path / "no-such.json"))


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["--seeds", "a,b"], "--seeds wants comma-separated integers"),
        (["--seeds", "1,1"], "--seeds wants distinct non-negative integers"),
        (["--arms", "dense,bogus"], "unknown arm 'bogus'"),
        (["--arms", "sla,salad"], "the arms must include 'dense'"),
        (["--arms", "dense,sla,sla"], "--arms lists an arm twice"),
        (["--finetune-steps", "0"], "finetune_steps and eval_every must be at least 1"),
        (["--finetune-lr", "-1"], "finetune_lr must be positive"),
        (["--task", "nocolon"], "--task wants package.module:function"),
        (["--task", "no_such_module_here:make"], "cannot import no_such_module_here"),
        (["--task", "json:no_such_function"], "json has no function 'no_such_function'"),
        (["--out", "/no/such/directory/q.json"], "--out /no/such/directory/q.json: its "
         "directory does not exist"),
    ],
)
def test_bad_requests_get_one_line_and_exit_2(capsys, argv, pattern):
    assert pattern in _error_line(capsys, "--size", "smoke", "--quiet", *argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a GPU-less host")
def test_gpu_size_without_a_gpu_says_so(capsys):
    assert "needs a CUDA GPU" in _error_line(capsys, "--size", "gpu")


def test_the_top_level_command_forwards_to_quality(capsys):
    assert sla_cli.main(["quality", "--seeds", "x"]) == 2
    assert "--seeds wants comma-separated integers" in capsys.readouterr().err


def _save_activations(path, generator, batch: int = 3, length: int = 64, **changes) -> None:
    q, k, v = (torch.randn(batch, 2, length, 64, generator=generator) for _ in range(3))
    entry = {"q": q, "k": k * 3, "v": v, **changes}
    torch.save([entry, {"q": q[:, :1], "k": k[:, :1], "v": v[:, :1]}], path)


def test_captured_activations_fit_the_projection(tmp_path, capsys, generator):
    captured = tmp_path / "qkv.pt"
    _save_activations(captured, generator)
    out_file = tmp_path / "acts.json"
    status, out, err = _run(capsys, "--activations", str(captured), "--arms",
                            "dense,sparse_only,sla,salad", "--finetune-steps", "6",
                            "--eval-every", "2", "--finetune-lr", "0.01", "--topk", "0.25",
                            "--block-q", "16", "--block-kv", "16", "--quiet", "--out",
                            str(out_file))
    assert status == 0, err
    doc = results.load(out_file)
    assert doc["settings"]["task"] == "activations:qkv.pt"
    assert doc["settings"]["protocol"]["pretrain_steps"] == 0
    assert doc["settings"]["sparsity"] == 0.75
    runs = {r["arm"]: r for r in doc["runs"]}
    assert runs["dense"]["heldout_loss"] < 1e-4  # bfloat16 rounding of dense attention
    # Steps take the two entries in turn: steps 0, 2 and 4 see the first one.
    assert runs["sparse_only"]["trained_parameters"] == 0
    assert runs["sparse_only"]["train_curve"][0] == runs["sparse_only"]["train_curve"][4]
    # Fitting the projection to dense attention lowers the training error.
    for arm in ("sla", "salad"):
        curve = runs[arm]["train_curve"]
        assert curve[4] < curve[0], arm
        assert len(runs[arm]["attention_error_layers"]) == 2  # one core per entry
    assert "target:" not in out and "vs dense" in out


@pytest.mark.parametrize(
    "changes,pattern",
    [
        (dict(q=None), "entry 0 is not a dict of tensors q, k, v"),
        (dict(q=torch.randn(3, 2, 64)), "entry 0: q, k and v must be floating tensors of rank 4"),
        (dict(v=torch.randn(3, 2, 60, 64)), "do not fit one attention call"),
        (dict(q=torch.randn(3, 2, 64, 32), k=torch.randn(3, 2, 64, 32),
              v=torch.randn(3, 2, 64, 32)), "head dim must be one of"),
    ],
)
def test_bad_activation_files_are_named(tmp_path, capsys, generator, changes, pattern):
    path = tmp_path / "bad.pt"
    _save_activations(path, generator, **changes)
    line = _error_line(capsys, "--activations", str(path), "--quiet")
    assert str(path) in line and pattern in line


def test_a_single_sample_cannot_be_held_out(tmp_path, capsys, generator):
    path = tmp_path / "one.pt"
    _save_activations(path, generator, batch=1)
    assert "needs a batch of at least 2 samples" in _error_line(capsys, "--activations",
                                                                 str(path))


def test_damaged_activation_file_is_named(tmp_path, capsys):
    path = tmp_path / "damaged.pt"
    path.write_bytes(b"\x00garbage" * 10)
    line = _error_line(capsys, "--activations", str(path))
    assert f"{path}: cannot be read as a torch.save file" in line


TASK_MODULE = textwrap.dedent('''
    import torch
    from torch import nn


    class Toy(nn.Module):
        def __init__(self, make_attention):
            super().__init__()
            self.qkv = nn.Linear(64, 3 * 64)
            self.core = make_attention(64)

        def forward(self, x):
            q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
            return self.core(q, k, v).squeeze(1)


    class ToyTask:
        def __init__(self, seed, device):
            g = torch.Generator().manual_seed(seed)
            self.data = torch.randn(4, 32, 64, generator=g)

        def build(self, make_attention):
            return Toy(make_attention)

        def train_batch(self, step):
            return self.data[step % 2: step % 2 + 2]

        def heldout_batches(self):
            return [self.data[2:]]

        def loss(self, model, batch):
            return (model(batch) - batch.flip(1)).square().mean()


    def make(seed, device):
        return ToyTask(seed, device)


    def junk(seed, device):
        return 42
''')


def test_a_users_task_runs_through_the_protocol(tmp_path, capsys, monkeypatch):
    (tmp_path / "user_quality_task.py").write_text(TASK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out_file = tmp_path / "user.json"
    status, out, err = _run(capsys, "--task", "user_quality_task:make", "--size", "smoke",
                            "--arms", "dense,sla", "--quiet", "--out", str(out_file))
    assert status == 0, err
    doc = results.load(out_file)
    assert doc["settings"]["task"] == "user_quality_task:make"
    assert doc["settings"]["tokens"] == [32]
    assert {r["arm"] for r in doc["runs"]} == {"dense", "sla"}
    line = _error_line(capsys, "--task", "user_quality_task:junk", "--size", "smoke")
    assert "returned a int without build, train_batch, heldout_batches, loss" in line
