"""``sambridge export --format onnx``: one export of the tiny student (fixed batch), checked with onnxruntime
against PyTorch fp32; the dynamic-batch default is exported under ``-m slow`` (twice the export time)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from data_pipelines.writer import sha256_of
from sambridge.cli import main
from sambridge.models import CheckpointError, create_model, load_student, save_student
from sambridge.models.fixed_vocabulary import FixedVocabularyGrounder
from sambridge.onnx_export import (
    DEFAULT_OPSET,
    DEFAULT_TOP_K,
    OUTPUTS,
    TOLERANCE,
    output_errors,
    sidecar_path,
    verify,
)
from sambridge.parsers import export_parser

PHRASES = ["red circle", "star", "leaf"]
TOP_K, BATCH = 5, 2


@pytest.fixture(scope="module")
def student_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("grounded_sam2_student_tiny")
    return save_student(model, "grounded_sam2_student_tiny", {}, tmp_path_factory.mktemp("onnx") / "student.pt")


def export(student: Path, out: Path, *extra: str) -> Path:
    """``sambridge export --format onnx`` of :data:`PHRASES` (" Star " normalises to "star")."""
    main(["export", "--format", "onnx", "--checkpoint", str(student), "--out", str(out), "--text", "red circle",
          "--text", " Star ", "--text", "leaf", "--top-k", str(TOP_K), *extra])
    return out


@pytest.fixture(scope="module")
def exported(student_file) -> Path:
    """The one export of the default suite: a fixed batch of :data:`BATCH` (the quicker export)."""
    return export(student_file, student_file.parent / "student.onnx", "--batch", str(BATCH))


@pytest.fixture(scope="module")
def grounder(student_file) -> FixedVocabularyGrounder:
    """The PyTorch model the graph must reproduce."""
    return FixedVocabularyGrounder(load_student(student_file), PHRASES, top_k=TOP_K)


def session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@torch.no_grad()
def assert_parity(path: Path, grounder: FixedVocabularyGrounder, batch: int, seed: int) -> None:
    """onnxruntime matches PyTorch fp32 within ``TOLERANCE`` relative error on every output."""
    images = torch.rand(batch, 3, 128, 128, generator=torch.Generator().manual_seed(seed))
    got = session(path).run(list(OUTPUTS), {"images": images.numpy()})
    expected = [x.numpy() for x in grounder(images)]
    assert [x.shape for x in got] == [x.shape for x in expected]
    errors = output_errors(expected, got)
    assert all(error <= TOLERANCE for error in errors.values()), errors


def test_onnxruntime_matches_pytorch_on_new_images(exported, grounder):
    assert_parity(exported, grounder, BATCH, seed=7)  # images the command's own check did not use
    with pytest.raises(onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument, match="images"):
        session(exported).run(None, {"images": np.zeros((1, 3, 128, 128), np.float32)})  # the batch is fixed


def test_the_graph_is_plain_standard_onnx(exported):
    model = onnx.load(exported)
    onnx.checker.check_model(model)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"} and not model.functions
    assert not [n.op_type for n in model.graph.node if "Sequence" in n.op_type]  # TensorRT's parser has none
    assert [(o.domain, o.version) for o in model.opset_import] == [("", DEFAULT_OPSET)]
    # the only input: the phrases' text features are constants of the graph
    assert [i.name for i in model.graph.input] == ["images"] and [o.name for o in model.graph.output] == list(OUTPUTS)
    assert not [n.name for n in model.graph.node if n.metadata_props]  # no stack traces of the exporting machine


def test_sidecar_says_what_the_tensors_mean(exported, student_file):
    sidecar = json.loads(sidecar_path(exported).read_text())
    assert sidecar["phrases"] == PHRASES and sidecar["top_k"] == TOP_K and sidecar["batch"] == BATCH
    assert sidecar["image_size"] == 128 and sidecar["opset"] == DEFAULT_OPSET
    assert sidecar["input"]["shape"] == [BATCH, 3, 128, 128] and "[0, 1]" in sidecar["input"]["meaning"]
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in onnx.load(exported).graph.output}
    assert {name: sidecar["outputs"][name]["shape"] for name in OUTPUTS} == shapes
    assert shapes["mask_logits"] == [BATCH, 3, TOP_K, 32, 32]
    assert "stride 4 " in sidecar["outputs"]["mask_logits"]["meaning"]
    assert sidecar["source"] == {"checkpoint": "student.pt", "sha256": sha256_of(student_file)}
    assert sidecar["parity"]["batches"] == [BATCH]
    assert all(0 <= error <= TOLERANCE for error in sidecar["parity"]["max_relative_error"].values())


@torch.no_grad()
def test_the_parity_check_fails_on_a_model_the_graph_does_not_reproduce(exported, student_file):
    perturbed = FixedVocabularyGrounder(load_student(student_file), PHRASES, top_k=TOP_K)
    weight = next(perturbed.model.vision.parameters())
    weight.add_(1e-2 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(CheckpointError, match=r"does not reproduce the model: relative error .*scores"):
        verify(session(exported), perturbed, [BATCH])


def test_detections_ranked_apart_by_a_near_tie_are_compared_by_box_and_others_by_rank():
    scores = np.array([[[0.9, 0.5, 0.5 - 1e-6, 0.1]]], np.float32)  # (B, P, K): ranks 1 and 2 nearly tie
    boxes = np.random.default_rng(0).random((1, 1, 4, 4)).astype(np.float32)
    masks = np.random.default_rng(1).random((1, 1, 4, 2, 2)).astype(np.float32)
    expected = [scores, boxes, masks, np.ones((1, 1), np.float32)]
    for order, aligned in (([0, 2, 1, 3], True), ([1, 0, 2, 3], False)):
        got = [scores, boxes[:, :, order], masks[:, :, order], expected[3]]
        errors = output_errors(expected, got)
        assert (errors["boxes_xyxy"] == 0 and errors["mask_logits"] == 0) is aligned, (order, errors)


def test_user_errors_end_with_one_line_and_exit_code_2(exported, student_file, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# no phrase yet\n")
    cases = (
        (["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "a.onnx"), "--text", "leaf"],
         "checkpoint not found"),
        (["--checkpoint", str(student_file), "--out", str(tmp_path / "a.onnx"), "--vocabulary", str(empty)],
         "empty.txt holds no phrase"),
        (["--checkpoint", str(student_file), "--out", str(exported), "--text", "leaf"], "student.onnx exists"),
    )
    for args, message in cases:
        with pytest.raises(SystemExit) as stopped:
            main(["export", "--format", "onnx", *args])
        assert stopped.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "a.onnx").exists()
    for args, message in ((["--text", "leaf"], "--text only go with --format onnx"),
                          (["--masks", "sam2"], "--masks only go with --format onnx"),
                          (["--format", "onnx", "--adapters-only"], "--adapters-only writes LoRA adapters")):
        with pytest.raises(SystemExit) as stopped:
            main(["export", "--checkpoint", str(student_file), "--out", str(tmp_path / "b"), *args])
        assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_help_states_the_defaults():
    text = export_parser().format_help()
    assert f"(default {DEFAULT_TOP_K})" in text and f"(default {DEFAULT_OPSET})" in text


@pytest.mark.slow
def test_the_default_dynamic_batch_graph_runs_any_batch(student_file, grounder, tmp_path):
    out = export(student_file, tmp_path / "dynamic.onnx")
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["batch"] is None and sidecar["input"]["shape"] == ["batch", 3, 128, 128]
    assert sidecar["parity"]["batches"] == [1, 3] and sidecar["outputs"]["scores"]["shape"] == ["batch", 3, TOP_K]
    for batch in (1, 4):
        assert_parity(out, grounder, batch, seed=batch)


@pytest.mark.slow
def test_sam2_decoder_masks_export_with_the_boxes(student_file, tmp_path):
    """``--masks sam2``: SAM2's mask decoder on every top-K box is in the graph, stride-4 logits."""
    out = export(student_file, tmp_path / "sam2.onnx", "--batch", "1", "--masks", "sam2")
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["masks"] == "sam2" and sidecar["outputs"]["mask_logits"]["shape"] == [1, 3, TOP_K, 32, 32]
    refined = FixedVocabularyGrounder(load_student(student_file), PHRASES, top_k=TOP_K, refine=True)
    assert_parity(out, refined, 1, seed=5)
