"""conceptlens: concept-based interpretability of vision models, as a library and a command line.

``import conceptlens as cl`` gives the public API below. Names are imported on first use (PEP 562),
so ``import conceptlens`` and the ``conceptlens`` command start fast and load no torch until a
name needs it.

Models
    ``load_model`` (a spec string such as ``"torchvision:resnet18"`` / ``"zoo:mobilenet_v2"``, or
    your own ``nn.Module``), ``list_layers``, ``LoadedModel``, ``LayerInfo``, ``Adapter``,
    ``ClassifierAdapter``, ``DetectorAdapter``.
Data
    ``FolderDataset`` (``images/`` + ``masks/<concept>/``), ``CocoDataset``, ``ImageSets``,
    ``SyntheticWorld``, ``RealTextureWorld``, ``ConceptDataset``, ``ArrayDataset``,
    ``write_folder_dataset``, ``read_image``, ``concept_image_sets``.
Embedding and storage
    ``embed``, ``embed_masks``, ``ActivationStore``, ``temporary_store`` (the default when a call
    is given no store).
Probes and concept vectors
    ``Net2VecProbe``, ``LinearCAV``, ``CAVSet``, ``train_cavs``, ``NMFConcepts``,
    ``MiniBatchNMFConcepts`` (online NMF, for data larger than memory), ``ConceptBank``.
One-call workflows
    ``probe_model`` (model + dataset → one bank per layer), ``ProbedModel``, ``compare_models``,
    ``set_activations`` and ``fit_image_cavs`` (image-level CAVs for TCAV).
Layer comparison
    ``supervised_similarity``, ``unsupervised_similarity``, ``cka_matrix``, ``ridge``.
Attribution
    ``tcav_scores``, ``TCAVResult``, ``holm``, ``bonferroni``; targets ``ClassLogit``,
    ``ClassProbability``, ``TopDetection``, ``MatchedDetection``, ``target_from_spec``; concept
    maps ``concept_maps``, ``concept_maps_batch``, ``gradient_cav_maps``, ``ImageConceptMaps``;
    ``ncav_importance``, ``NCAVImportance``.
Pipeline and report
    ``load_config``, ``PipelineConfig``, ``run_pipeline``, ``PipelineResult``, ``write_report``.
Errors
    ``ConceptLensError``: every error names its culprit and the fix.

Everything else is reached through its module path (``conceptlens.concepts.store.activations``
…) and is not part of this curated API.
"""

from conceptlens.concepts._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    # models
    "Adapter": "conceptlens.concepts.models.adapters",
    "ClassifierAdapter": "conceptlens.concepts.models.adapters",
    "DetectorAdapter": "conceptlens.concepts.models.adapters",
    "LayerInfo": "conceptlens.concepts.models.loading",
    "LoadedModel": "conceptlens.concepts.models.loading",
    "list_layers": "conceptlens.concepts.models.loading",
    "load_model": "conceptlens.concepts.models.loading",
    # data
    "ArrayDataset": "conceptlens.concepts.data.dataset",
    "ConceptDataset": "conceptlens.concepts.data.dataset",
    "CocoDataset": "conceptlens.concepts.data.coco",
    "FolderDataset": "conceptlens.concepts.data.folder",
    "ImageSets": "conceptlens.concepts.data.image_sets",
    "RealTextureWorld": "conceptlens.concepts.data.real_textures",
    "SyntheticWorld": "conceptlens.concepts.data.synthetic",
    "concept_image_sets": "conceptlens.concepts.data.concept_sets",
    "read_image": "conceptlens.concepts.data.imageio",
    "write_folder_dataset": "conceptlens.concepts.data.folder",
    # embedding and storage
    "ActivationStore": "conceptlens.concepts.store.activations",
    "embed": "conceptlens.concepts.embedding.embed",
    "embed_masks": "conceptlens.concepts.embedding.masks",
    "temporary_store": "conceptlens.concepts.store.temporary",
    # probes and concept vectors
    "CAVSet": "conceptlens.probes.linear",
    "ConceptBank": "conceptlens.concepts.vectors.bank",
    "LinearCAV": "conceptlens.probes.linear",
    "MiniBatchNMFConcepts": "conceptlens.probes.nmf",
    "NMFConcepts": "conceptlens.probes.nmf",
    "Net2VecProbe": "conceptlens.probes.net2vec",
    "train_cavs": "conceptlens.probes.linear",
    # one-call workflows
    "ProbedModel": "conceptlens.concepts.vectors.probed",
    "compare_models": "conceptlens.concepts.compare.workflow",
    "fit_image_cavs": "conceptlens.probes.image_cavs",
    "probe_model": "conceptlens.probes.workflow",
    "set_activations": "conceptlens.probes.image_cavs",
    # layer comparison
    "cka_matrix": "conceptlens.concepts.compare.cka",
    "ridge": "conceptlens.concepts.compare.similarity",
    "supervised_similarity": "conceptlens.concepts.compare.similarity",
    "unsupervised_similarity": "conceptlens.concepts.compare.similarity",
    # attribution
    "ClassLogit": "conceptlens.attribution.targets",
    "ClassProbability": "conceptlens.attribution.targets",
    "ImageConceptMaps": "conceptlens.attribution.maps",
    "MatchedDetection": "conceptlens.attribution.targets",
    "NCAVImportance": "conceptlens.attribution.ncav",
    "TCAVResult": "conceptlens.attribution.tcav",
    "TopDetection": "conceptlens.attribution.targets",
    "bonferroni": "conceptlens.attribution.tcav",
    "concept_maps": "conceptlens.attribution.maps",
    "concept_maps_batch": "conceptlens.attribution.maps",
    "gradient_cav_maps": "conceptlens.attribution.maps",
    "holm": "conceptlens.attribution.tcav",
    "ncav_importance": "conceptlens.attribution.ncav",
    "target_from_spec": "conceptlens.attribution.targets",
    "tcav_scores": "conceptlens.attribution.tcav",
    # pipeline and report
    "PipelineConfig": "conceptlens.config",
    "PipelineResult": "conceptlens.pipeline",
    "load_config": "conceptlens.config",
    "run_pipeline": "conceptlens.pipeline",
    "write_report": "conceptlens.report",
    # errors
    "ConceptLensError": "conceptlens.concepts.errors",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
