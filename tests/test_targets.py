"""Attribution targets: classifier logits/probabilities, detector top/matched detections, specs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from conceptlens.attribution.targets import (
    ClassLogit,
    ClassProbability,
    MatchedDetection,
    Target,
    TargetError,
    TargetValues,
    TopDetection,
    check_differentiable,
    describe_missing,
    target_from_spec,
)
from conceptlens.concepts.errors import ConceptLensError
from conceptlens.concepts.models.loading import load_model
from conceptlens.concepts.data.synthetic import OBJECT_CLASSES, SyntheticWorld

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


# -- classifier targets ------------------------------------------------------------------------


def _linear():
    torch.manual_seed(1)
    model = nn.Linear(5, 3)
    x = torch.randn(4, 5, requires_grad=True)
    return model, x


def test_class_logit_value_and_gradient():
    model, x = _linear()
    tv = ClassLogit(2)(model(x))
    assert isinstance(ClassLogit(2), Target)
    expected = x.detach() @ model.weight.detach()[2] + model.bias.detach()[2]
    torch.testing.assert_close(tv.values.detach(), expected)
    assert tv.valid.all() and tv.index is None
    (grad,) = torch.autograd.grad(tv.values.sum(), x)
    torch.testing.assert_close(grad, model.weight.detach()[2].expand(4, 5))


def test_class_probability_value_and_gradient():
    model, x = _linear()
    tv = ClassProbability(1)(model(x))
    logits = x.detach() @ model.weight.detach().T + model.bias.detach()
    p = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    torch.testing.assert_close(tv.values.detach(), p[:, 1])
    (grad,) = torch.autograd.grad(tv.values.sum(), x)
    # d p_k / d x = p_k (W_k - Σ_j p_j W_j)
    w = model.weight.detach()
    analytic = p[:, 1:2] * (w[1][None] - p @ w)
    torch.testing.assert_close(grad, analytic)


def test_classifier_targets_name_and_describe_themselves():
    logit, prob = ClassLogit(2), ClassProbability(1)
    assert (logit.k, logit.name, logit.what, repr(logit)) == (2, "logit:2", "logit of class 2", "ClassLogit(2)")
    assert (prob.k, prob.name, prob.what, repr(prob)) == (1, "prob:1", "probability of class 1", "ClassProbability(1)")
    assert not isinstance(prob, ClassLogit) and not isinstance(logit, ClassProbability)
    tv = TargetValues(torch.zeros(2), torch.tensor([True, False]))
    assert describe_missing(tv, ["a", "b"], prob) == "1 of 2 images have no probability of class 1 (prob:1): b"


def test_classifier_target_rejects_bad_output_and_class():
    with pytest.raises(TargetError, match="out of range"):
        ClassLogit(7)(torch.zeros(2, 3))
    with pytest.raises(TargetError, match="classifier logits"):
        ClassLogit(0)([{"scores": torch.zeros(0), "labels": torch.zeros(0)}])


def test_no_grad_is_reported():
    model, x = _linear()
    with torch.no_grad():
        tv = ClassLogit(0)(model(x))
    with pytest.raises(TargetError, match="no_grad"):
        check_differentiable(tv, ClassLogit(0))


# -- detector targets on hand-made output -------------------------------------------------------


def _fake_output():
    s0 = torch.tensor([0.9, 0.4, 0.7], requires_grad=True)
    s1 = torch.tensor([0.3], requires_grad=True)
    out = [
        {"boxes": torch.tensor([[0, 0, 10, 10], [0, 0, 20, 20], [50, 50, 60, 60.0]]), "scores": s0, "labels": torch.tensor([1, 2, 2])},
        {"boxes": torch.tensor([[5, 5, 15, 15.0]]), "scores": s1, "labels": torch.tensor([1])},
    ]
    return out, s0, s1


def test_top_detection_on_hand_made_output():
    out, s0, s1 = _fake_output()
    tv = TopDetection(2)(out)
    assert tv.values.tolist() == pytest.approx([0.7, 0.0])
    assert tv.valid.tolist() == [True, False] and tv.index.tolist() == [2, -1]
    tv.values.sum().backward()  # the invalid zero stays in the graph
    assert s0.grad.tolist() == [0, 0, 1] and s1.grad.tolist() == [0]
    line = describe_missing(tv, ["a", "b"], TopDetection(2))
    assert line == "1 of 2 images have no detection of class 2 (top:2): b"
    assert describe_missing(TopDetection(1)(out)) == ""
    assert TopDetection(2, min_score=0.8)(out).valid.tolist() == [False, False]


def test_matched_detection_on_hand_made_output():
    out, _, _ = _fake_output()
    boxes = torch.tensor([[0, 0, 19, 19.0], [5, 5, 15, 15]])
    tv = MatchedDetection(None, boxes)(out)
    assert tv.index.tolist() == [1, 0] and tv.values.tolist() == pytest.approx([0.4, 0.3])
    # a label filter, per-image boxes as a list with a None entry
    tv = MatchedDetection(1, [torch.tensor([0, 0, 19, 19.0]), None], min_iou=0.2)(out)
    assert tv.index.tolist() == [0, -1] and tv.valid.tolist() == [True, False]
    with pytest.raises(TargetError, match="boxes for 2 images"):
        MatchedDetection(1, torch.zeros(3, 4))(out)


# -- torchvision detectors ------------------------------------------------------------------------


def _images(n: int = 2, size: int = 96) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.rand(3, size, size + 16 * i, generator=g).requires_grad_() for i in range(n)]


@pytest.fixture(scope="module", params=["fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large", "ssd300_vgg16"])
def torchvision_detector(request):
    model = load_model(f"torchvision:{request.param}", "none").module.eval()
    if hasattr(model, "roi_heads"):
        model.roi_heads.score_thresh = 0.0
    else:
        model.score_thresh = 0.0
    return model


def test_torchvision_detector_targets_have_input_gradients(torchvision_detector):
    images = _images()
    output = torchvision_detector(images)
    labels = torch.cat([d["labels"] for d in output])
    assert labels.numel() > 0, "no detections even at score_thresh 0"
    present = int(labels[0])
    absent = next(k for k in range(1, 1000) if not (labels == k).any())

    top = TopDetection(present)
    box = output[0]["boxes"][0].detach()
    matched = MatchedDetection(present, box[None].expand(len(images), 4), min_iou=0.0)
    missing = TopDetection(absent)
    tvs = [t(output) for t in (top, matched, missing)]
    for tv in tvs:
        check_differentiable(tv)

    assert tvs[0].valid[0] and tvs[1].valid[0]
    assert tvs[0].values[0].item() == pytest.approx(output[0]["scores"][0].item())  # scores are sorted
    assert not tvs[2].valid.any()
    assert describe_missing(tvs[2], ["im0", "im1"], missing).startswith(f"2 of 2 images have no detection of class {absent}")

    total = sum(tv.values[tv.valid].sum() for tv in tvs[:2]) + tvs[2].values.sum()
    grads = torch.autograd.grad(total, images, allow_unused=True)
    for i, g in enumerate(grads):
        if tvs[0].valid[i] or tvs[1].valid[i]:
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, f"image {i}"


# -- the shipped zoo detectors on a synthetic scene ----------------------------------------------


@pytest.mark.parametrize("name", ["synthetic_vgg_centernet", "synthetic_resnet_fpn"])
def test_zoo_detector_targets(name):
    loaded = load_model(f"zoo:{name}")
    world = SyntheticWorld(4, seed=3)
    images = [world.image(i) for i in range(len(world))]
    x = loaded.adapter.prepare(images, CPU).requires_grad_()
    output, _ = loaded.adapter.forward(loaded.module, x, [im.shape[:2] for im in images])

    checked_top = checked_match = 0
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        scale = torch.tensor([128 / w, 128 / h, 128 / w, 128 / h])
        for obj in world.objects(i):
            label = OBJECT_CLASSES.index(obj.label) + 1
            det = output[i]
            of_label = det["labels"] == label

            tv = TopDetection(label)(output)
            assert tv.valid[i] == bool(of_label.any())
            if tv.valid[i]:
                assert tv.values[i].item() == pytest.approx(det["scores"][of_label].max().item())
                (g,) = torch.autograd.grad(tv.values[i], x, retain_graph=True)
                assert torch.isfinite(g).all() and g[i].abs().sum() > 0
                checked_top += 1

            gt = torch.tensor(obj.box, dtype=torch.float32) * scale
            boxes = [gt if j == i else None for j in range(len(images))]
            mv = MatchedDetection(label, boxes, min_iou=0.1)(output)
            assert mv.valid.sum() <= 1
            if of_label.any():
                iou = box_iou(gt[None], det["boxes"].detach())[0]
                iou[~of_label] = -1
                if iou.max() >= 0.1:
                    assert mv.valid[i] and iou[mv.index[i]] == iou.max()
                    assert mv.values[i].item() == pytest.approx(det["scores"][mv.index[i]].item())
                    checked_match += 1
    assert checked_top >= 3 and checked_match >= 3


# -- specs ----------------------------------------------------------------------------------------


def test_target_from_spec():
    assert isinstance(target_from_spec("logit:3"), ClassLogit) and target_from_spec("logit:3").k == 3
    assert isinstance(target_from_spec("prob:0"), ClassProbability) and target_from_spec("prob:0").name == "prob:0"
    top = target_from_spec("top:2")
    assert isinstance(top, TopDetection) and top.label == 2 and top.min_score == 0
    assert target_from_spec("top:2:0.3").min_score == pytest.approx(0.3)
    box = target_from_spec("box:1:10,20,30.5,40")
    assert isinstance(box, MatchedDetection) and box.label == 1
    assert box.boxes.tolist() == [10, 20, 30.5, 40] and box.name == "box:1:10,20,30.5,40"
    assert target_from_spec("box:any:0,0,1,1").label is None


@pytest.mark.parametrize("spec", ["", "logit", "logit:x", "prob:1:2", "top:a", "box:1:1,2,3", "box:1:3,3,1,1", "box:1", "grad:1"])
def test_bad_spec_names_spec_and_forms(spec):
    with pytest.raises(ConceptLensError) as info:
        target_from_spec(spec)
    message = str(info.value)
    assert isinstance(info.value, TargetError)
    assert repr(spec) in message and "logit:K" in message and "box:K:x0,y0,x1,y1" in message


def test_target_values_missing_ids():
    tv = TargetValues(torch.zeros(3), torch.tensor([True, False, False]))
    assert tv.n_missing == 2 and tv.missing() == [1, 2] and tv.missing(np.array(["a", "b", "c"])).__len__() == 2
