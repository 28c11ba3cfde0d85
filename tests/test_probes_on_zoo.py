"""Probes find real concepts in the shipped models: part concepts in the synthetic-world detectors,
textures in the real ImageNet pair — each far above a control trained on shuffled masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptlens.concepts.embedding.embed import embed
from conceptlens.concepts.embedding.masks import embed_masks
from conceptlens.concepts.models.loading import load_model
from conceptlens.concepts.store.activations import ActivationStore, StoreEntry
from conceptlens.concepts.data.synthetic import SyntheticWorld
from conceptlens.probes.net2vec import Net2VecProbe

PARTS = ["wheel", "window", "roof", "door", "trunk", "crown", "sail", "hull"]


pytestmark = pytest.mark.usefixtures("one_thread")


def shuffled_masks(masks: StoreEntry, store: ActivationStore, seed: int = 0) -> StoreEntry:
    """The control: every image gets the masks of another image (same ids, same split)."""
    manifest = masks.manifest()
    all_masks, valid = masks.read_all("masks"), masks.read_all("valid")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(all_masks)))
    control = store.entry({"control": masks.key, "seed": seed})
    control.write_shard(0, len(order), {"masks": all_masks[order], "valid": valid[order]})
    control.finalize({"request": manifest["request"], "dataset": manifest["dataset"]}, len(order))
    return control


def probe_iou(model_spec: str, dataset, layer: str, concepts: list[str], store: ActivationStore, grid=(32, 32)) -> tuple[dict, dict]:
    model = load_model(model_spec)
    activations = embed(model, dataset, [layer], store, batch_size=32).entries[layer]
    masks = embed_masks(dataset, store, grid=grid)
    results = []
    for mask_entry in (masks, shuffled_masks(masks, store)):
        probe = Net2VecProbe(max_epochs=10, patience=3, seed=0).fit(activations, mask_entry)
        metrics = probe.evaluate(activations, mask_entry, "test")
        results.append({c: metrics[c]["set_iou"] or 0.0 for c in concepts})
    return results[0], results[1]


@pytest.mark.slow
@pytest.mark.parametrize(("spec", "layer"), [("zoo:synthetic_vgg_centernet", "backbone.block4"), ("zoo:synthetic_resnet_fpn", "neck.p3")])
def test_detector_mid_layers_encode_parts(tmp_path, spec, layer):
    world = SyntheticWorld(n_images=240, seed=11)
    real, control = probe_iou(spec, world, layer, PARTS, ActivationStore(tmp_path))
    assert np.mean(list(real.values())) > 0.25
    for part in PARTS:  # clearly above the control: three times its IoU and 0.05 more
        assert real[part] > 3 * control[part] and real[part] > control[part] + 0.05, (part, real[part], control[part])


@pytest.mark.slow
@pytest.mark.parametrize(("spec", "layer"), [("zoo:mobilenet_v2", "features.7"), ("zoo:efficientnet_lite0", "_blocks.8")])
def test_real_pair_mid_layers_segment_textures(tmp_path, spec, layer):
    pytest.importorskip("skimage", reason="the [real] extra (scikit-image) is not installed")
    from conceptlens.concepts.data.real_textures import RealTextureWorld
    from conceptlens.concepts.models.zoo.real import mobilenet_v2  # noqa: F401  (skips below if weights are missing)

    try:
        load_model(spec)
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"{spec} unavailable: {error}")
    world = RealTextureWorld(n_images=120, seed=3, size=160)
    real, control = probe_iou(spec, world, layer, ["brick", "grass", "gravel"], ActivationStore(tmp_path), grid=(40, 40))
    for texture in ("brick", "grass", "gravel"):
        assert real[texture] > 0.25 and real[texture] > 3 * control[texture], (texture, real[texture], control[texture])
