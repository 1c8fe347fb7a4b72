"""Geometry: masks must come back on the input grid and line up in world space, whatever the
orientation (KiTS IPL, RAS, LPS, a permuted one, and oblique)."""

import copy
import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segcore.checkpoint import KITS19_LABELS, CheckpointMeta
from segcore.errors import CheckpointError
from segcore.inference import Engine, Prediction, _Upsampler
from segcore.io import Volume
from segcore.metrics import dice
from segcore.postprocess import PostprocessConfig, foreground_bbox
from segcore.preprocessing import (
    PreprocessConfig,
    bilinear_taps,
    body_box,
    box_from_canonical,
    canonical_info,
    canonical_view,
    from_canonical,
    model_grid,
    model_slices,
    normalize,
    preprocess_case,
)
from segcore.unet import UNet, UNetConfig
from tests.conftest import GEOM_PP, ORIENTATIONS, IntensityModel, make_volume, voxel_world


@pytest.mark.parametrize("codes", list(ORIENTATIONS.values()))
def test_canonical_roundtrip_is_exact(codes: tuple[str, str, str]) -> None:
    hu, aff, _ = make_volume(codes)
    canon = canonical_info(aff, hu.shape)
    view = canonical_view(hu, canon)
    assert view.shape == canon.shape_zyx
    back = from_canonical(np.ascontiguousarray(view), canon)
    assert back.shape == hu.shape
    np.testing.assert_array_equal(back, hu)


@pytest.mark.parametrize("codes", list(ORIENTATIONS.values()))
def test_canonical_view_is_ras_ordered(codes: tuple[str, str, str]) -> None:
    hu, aff, _ = make_volume(codes)
    canon = canonical_info(aff, hu.shape)
    view = canonical_view(hu, canon)  # (Z, Y, X)
    ref_hu, _, _ = make_volume(("R", "A", "S"))
    np.testing.assert_array_equal(view, ref_hu.transpose(2, 1, 0))
    assert canon.spacing_zyx == pytest.approx((2.5, 1.2, 1.0))


def _engine(pp: PreprocessConfig) -> Engine:
    cfg = UNetConfig(in_slices=3, base_width=4, depth=3)
    meta = CheckpointMeta(cfg, pp, dict(KITS19_LABELS))
    return Engine(IntensityModel(cfg, pp), meta, torch.device("cpu"), batch_size=4, precision="fp32", backend="torch")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_engine_mask_is_exact_on_input_grid_native_spacing(name: str) -> None:
    hu, aff, truth = make_volume(ORIENTATIONS[name])
    vol = Volume(hu, aff, nib.Nifti1Header(), (1.0, 1.0, 1.0))
    pred = _engine(GEOM_PP).predict(vol)
    assert pred.mask.shape == hu.shape and pred.mask.dtype == np.uint8
    np.testing.assert_array_equal(pred.mask, truth)
    _assert_box_holds_the_foreground(pred)


def _assert_box_holds_the_foreground(pred: Prediction) -> None:
    """The engine's box (handed to the statistics) holds every foreground voxel, and not much more."""
    assert pred.box is not None
    inside = np.zeros(pred.mask.shape, dtype=bool)
    inside[pred.box] = True
    assert not bool((pred.mask[~inside] > 0).any())
    assert int(inside.sum()) < 0.6 * inside.size


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_box_from_canonical_selects_the_same_voxels(name: str) -> None:
    hu, aff, _ = make_volume(ORIENTATIONS[name])
    canon = canonical_info(aff, hu.shape)
    rng = np.random.default_rng(7)
    for _ in range(5):
        box = [tuple(sorted(rng.choice(n + 1, size=2, replace=False).tolist())) for n in canon.shape_zyx]
        mask = np.zeros(hu.shape, dtype=np.uint8)
        canonical_view(mask, canon)[box[0][0] : box[0][1], box[1][0] : box[1][1], box[2][0] : box[2][1]] = 1
        assert foreground_bbox(mask) == box_from_canonical(box, canon)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name, oblique", [("IPL", 0.0), ("RAS", 0.0), ("LPS", 0.0), ("PSR", 0.0), ("LPS", 25.0), ("IPL", 33.0)]
)
def test_engine_mask_aligns_in_world_space_with_resampling(name: str, oblique: float) -> None:
    # The model grid differs from the input grid (1.6 mm in-plane), so labels travel through
    # resampling both ways; the truth is defined in world coordinates.
    hu, aff, truth = make_volume(ORIENTATIONS[name], oblique_deg=oblique)
    vol = Volume(hu, aff, nib.Nifti1Header(), (1.0, 1.0, 1.0))
    pp = PreprocessConfig(target_spacing_mm=(1.6, 1.6), clip_hu=GEOM_PP.clip_hu, mean=GEOM_PP.mean, std=GEOM_PP.std)
    pred = _engine(pp).predict(vol)
    assert pred.mask.shape == hu.shape
    assert dice(pred.mask > 0, truth > 0) > 0.95
    _assert_box_holds_the_foreground(pred)
    assert dice(pred.mask == 2, truth == 2) > 0.9
    # A mirrored mask (a classic orientation bug) must score far lower.
    assert dice(pred.mask[::-1, ::-1, ::-1] == 2, truth == 2) < 0.2


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name, oblique", [("IPL", 0.0), ("LPS", 25.0)])
def test_cuda_engine_puts_labels_where_the_cpu_engine_does(name: str, oblique: float, precision: str) -> None:
    # The CUDA path (pinned copies, resampling taps on the device, autocast, channels_last) must
    # give the CPU path's mask on the input grid, for the KiTS layout and an oblique LPS volume.
    hu, aff, truth = make_volume(ORIENTATIONS[name], oblique_deg=oblique)
    vol = Volume(hu, aff, nib.Nifti1Header(), (1.0, 1.0, 1.0))
    pp = PreprocessConfig(target_spacing_mm=(1.6, 1.6), clip_hu=GEOM_PP.clip_hu, mean=GEOM_PP.mean, std=GEOM_PP.std)
    cfg = UNetConfig(in_slices=3, base_width=4, depth=3)
    # No component filter: one flipped voxel could change which component is the largest.
    meta = CheckpointMeta(cfg, pp, dict(KITS19_LABELS), postprocessing=PostprocessConfig(keep_largest=False))
    torch.manual_seed(1)
    net = UNet(cfg).eval()
    with torch.no_grad():  # large random weights: every class wins somewhere
        for prm in net.parameters():
            prm.normal_(0.0, 0.5)
    for model in (IntensityModel(cfg, pp), net):
        masks = {}
        for dev in ("cpu", "cuda"):
            eng = Engine(
                copy.deepcopy(model),  # type: ignore[arg-type]
                meta,
                torch.device(dev),
                batch_size=4,
                precision=precision if dev == "cuda" else "fp32",
                backend="torch",
            )
            masks[dev] = eng.predict(vol).mask
        assert masks["cuda"].shape == hu.shape and masks["cuda"].dtype == np.uint8
        if isinstance(model, IntensityModel):
            assert dice(masks["cuda"] > 0, truth > 0) > 0.95 and dice(masks["cuda"] == 2, truth == 2) > 0.9
        assert set(np.unique(masks["cuda"])) == set(np.unique(masks["cpu"]))
        # TF32 or bf16 arithmetic may flip voxels whose classes are nearly tied, and no more.
        assert float((masks["cuda"] != masks["cpu"]).mean()) < (0.002 if precision == "fp32" else 0.02)


class _MirrorAveraged(torch.nn.Module):
    """What mirroring must compute: the mean of the logits and the un-flipped flipped logits."""

    def __init__(self, net: UNet) -> None:
        super().__init__()
        self.net = net
        self.config = net.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.net(x) + self.net(x.flip(-1)).flip(-1)) * 0.5


@pytest.mark.parametrize("air", [False, True])
def test_engine_mirror_averages_left_right_flipped_logits(air: bool) -> None:
    hu, aff, _ = make_volume(ORIENTATIONS["LPS"])
    hu = hu + np.random.default_rng(0).normal(0, 40, hu.shape).astype(np.float32)  # no symmetry
    if air:  # the body crop is on: both passes run on the same window
        hu = _with_air(hu, aff, rx=25.0, ry=22.0)
    vol = Volume(hu, aff, nib.Nifti1Header(), (1.0, 1.0, 1.0))
    cfg = UNetConfig(in_slices=3, base_width=4, depth=3)
    torch.manual_seed(1)
    net = UNet(cfg).eval()
    with torch.no_grad():  # large random weights: every class wins somewhere
        for prm in net.parameters():
            prm.normal_(0.0, 0.5)
    meta = CheckpointMeta(
        cfg, PreprocessConfig(clip_hu=GEOM_PP.clip_hu, mean=GEOM_PP.mean, std=GEOM_PP.std), dict(KITS19_LABELS)
    )
    meta = dataclasses.replace(meta, postprocessing=PostprocessConfig(keep_largest=False))

    def run(model: torch.nn.Module, mirror: bool) -> np.ndarray:
        return (
            Engine(model, meta, torch.device("cpu"), batch_size=4, precision="fp32", mirror=mirror, backend="torch")
            .predict(vol)
            .mask
        )  # type: ignore[arg-type]

    mirrored = run(net, True)
    np.testing.assert_array_equal(mirrored, run(_MirrorAveraged(net).eval(), False))
    assert (mirrored != run(net, False)).any()  # a random net is not left-right symmetric


class _ProbabilityAveraged(torch.nn.Module):
    """What an ensemble must compute: the log of its members' mean softmax (mirrored each)."""

    def __init__(self, nets: list[UNet], mirror: bool) -> None:
        super().__init__()
        self.nets = torch.nn.ModuleList(nets)
        self.config = nets[0].config
        self.mirror = mirror

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = []
        for net in self.nets:
            logits = (net(x) + net(x.flip(-1)).flip(-1)) * 0.5 if self.mirror else net(x)
            probs.append(torch.softmax(logits, 1))
        return torch.log(sum(probs) / len(probs))  # type: ignore[arg-type]


@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_engine_ensemble_averages_its_members_probabilities(backend: str, mirror: bool) -> None:
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")  # the onnx extra, which scripts/setup.sh installs
    hu, aff, _ = make_volume(ORIENTATIONS["LPS"])
    hu = hu + np.random.default_rng(0).normal(0, 40, hu.shape).astype(np.float32)
    vol = Volume(hu, aff, nib.Nifti1Header(), (1.0, 1.0, 1.0))
    cfg = UNetConfig(in_slices=3, base_width=4, depth=3)
    nets = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        net = UNet(cfg).eval()
        with torch.no_grad():  # large random weights: every class wins somewhere, differently per member
            for prm in net.parameters():
                prm.normal_(0.0, 0.5)
        nets.append(net)
    meta = CheckpointMeta(
        cfg, PreprocessConfig(clip_hu=GEOM_PP.clip_hu, mean=GEOM_PP.mean, std=GEOM_PP.std), dict(KITS19_LABELS)
    )
    meta = dataclasses.replace(meta, postprocessing=PostprocessConfig(keep_largest=False))
    kw = {"batch_size": 4, "precision": "fp32", "mirror": mirror, "backend": backend}
    cpu = torch.device("cpu")
    ensemble = Engine(nets[0], meta, cpu, ensemble=[(n, meta) for n in nets[1:]], **kw)  # type: ignore[arg-type]
    assert len(ensemble.members) == 3 and ensemble.backend == backend
    # ONNX Runtime members share one memory arena, as they run one after the other; a single
    # network keeps its own.
    assert [o.shared_arena for o in ensemble._orts] == ([True] * 3 if backend == "onnxruntime" else [])
    got = ensemble.predict(vol)
    ref = Engine(_ProbabilityAveraged(nets, mirror).eval(), meta, cpu, **{**kw, "backend": "torch", "mirror": False})  # type: ignore[arg-type]
    want = ref.predict(vol)
    # ONNX Runtime's float arithmetic differs from torch's in the last bits: voxels on a near tie may flip.
    assert float((got.mask != want.mask).mean()) <= (0 if backend == "torch" else 1e-4)
    for c, v in want.confidence.items():
        assert got.confidence[c] == pytest.approx(v, abs=1e-4)
    single_engines = [Engine(n, meta, cpu, **kw) for n in nets]  # type: ignore[arg-type]
    assert not any(o.shared_arena for e in single_engines for o in e._orts)
    singles = [e.predict(vol).mask for e in single_engines]
    assert all((got.mask != m).any() for m in singles)  # the average is none of its members
    # Members trained another way are refused, naming what differs.
    other = dataclasses.replace(meta, preprocessing=dataclasses.replace(meta.preprocessing, mean=GEOM_PP.mean + 1))
    with pytest.raises(CheckpointError, match=r"member 1 .* preprocessing"):
        Engine(nets[0], meta, cpu, ensemble=[(nets[1], other)], **kw)  # type: ignore[arg-type]


def test_model_grid_sizes() -> None:
    pp = PreprocessConfig(target_spacing_mm=(1.6, 1.6))
    assert model_grid((512, 512), (0.8, 0.8), pp) == (256, 256)
    assert model_grid((512, 796), (0.8, 0.8), pp) == (256, 398)
    assert model_grid((100, 100), (1.0, 1.0), PreprocessConfig(target_spacing_mm=None)) == (100, 100)


def test_preprocess_config_antialias_round_trip_and_older_configs() -> None:
    pp = PreprocessConfig(target_spacing_mm=(2.5, 2.5), antialias=True)
    assert PreprocessConfig.from_dict(json.loads(json.dumps(pp.to_dict()))) == pp
    older = {k: v for k, v in pp.to_dict().items() if k != "antialias"}  # written before the field
    assert PreprocessConfig.from_dict(older).antialias is False


def test_preprocess_case_resamples_labels_and_normalises() -> None:
    hu, aff, truth = make_volume(ORIENTATIONS["IPL"])
    pp = PreprocessConfig(target_spacing_mm=(2.0, 2.0), clip_hu=(-100.0, 300.0), mean=100.0, std=100.0)
    pc = preprocess_case(hu, aff, truth, pp, num_classes=3)
    assert pc.label is not None
    assert pc.image.shape == pc.label.shape == (20, 36, 36)
    assert pc.image.dtype == np.float16 and pc.label.dtype == np.uint8
    assert float(pc.image.max()) <= 2.0 + 1e-3 and float(pc.image.min()) >= -2.0 - 1e-3
    # Label volume fractions survive resampling.
    for c in (1, 2):
        assert abs((pc.label == c).mean() - (truth == c).mean()) < 0.2 * (truth == c).mean()


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("orientation", ["IPL", "LPS"])
def test_preprocess_case_labels_are_the_one_hot_resampling_of_every_slice(orientation: str, antialias: bool) -> None:
    # Only slices with foreground are resampled, and the argmax is max's indices: the labels must
    # still be those of the whole volume's one-hot maps resampled and argmaxed, ties included.
    hu, aff, truth = make_volume(ORIENTATIONS[orientation], shape_ras=(72, 60, 30))
    pp = PreprocessConfig(target_spacing_mm=(2.0, 2.0), antialias=antialias)
    pc = preprocess_case(hu, aff, truth, pp, num_classes=3, chunk=7)
    assert pc.label is not None
    canon = canonical_info(aff, truth.shape)
    lab = torch.from_numpy(np.ascontiguousarray(canonical_view(truth, canon)).astype(np.int64))
    has_fg = (lab > 0).flatten(1).any(1)
    assert 0 < int(has_fg.sum()) < len(lab)  # both kinds of slice, in chunks of 7
    onehot = F.one_hot(lab, 3).permute(0, 3, 1, 2).float()
    size = tuple(pc.label.shape[1:])
    want = F.interpolate(onehot, size=size, mode="bilinear", align_corners=False, antialias=antialias).argmax(1)
    assert np.array_equal(pc.label, want.numpy())
    assert (pc.label[~has_fg.numpy()] == 0).all() and (pc.label[has_fg.numpy()] > 0).any()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"orientation": "LPS"},
        {"target_spacing_mm": (0.0, 1.0)},
        {"clip_hu": (10.0, -10.0)},
        {"std": 0.0},
        {"antialias": "yes"},
    ],
)
def test_bad_preprocess_config(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PreprocessConfig(**kwargs)


@pytest.mark.parametrize(("n_in", "n_out"), [(250, 512), (256, 796), (300, 301), (64, 64), (512, 250), (7, 19)])
def test_bilinear_taps_match_interpolate(n_in: int, n_out: int) -> None:
    v = torch.randn(3, 5, n_in, 4)
    ref = F.interpolate(v, size=(n_out, 4), mode="bilinear", align_corners=False)
    i0, i1, w1 = bilinear_taps(n_in, n_out)
    assert i0.shape == i1.shape == w1.shape == (n_out,)
    d = i1 - i0
    assert bool(((d == 0) | (d == 1)).all()) and bool(((w1 >= 0) & (w1 <= 1)).all())
    # Monotone: the input range an output range reads is contiguous (the engine relies on it).
    assert bool((i0.diff() >= 0).all()) and bool((i1.diff() >= 0).all())
    assert int(i0.min()) >= 0 and int(i1.max()) <= n_in - 1
    got = v[:, :, i0] * (1 - w1)[:, None] + v[:, :, i1] * w1[:, None]
    # Same source coordinates and weights up to float32 rounding of the coordinate (~1e-5).
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def _reference_labels(logits: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain way: resample every logit to the input grid, then argmax; plus the top-2 gap."""
    up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    top = up.topk(2, dim=1).values
    return up.argmax(dim=1), top[:, 0] - top[:, 1]


@pytest.mark.parametrize("size", [(512, 512), (180, 796), (64, 64)])
def test_cropped_label_upsampling_equals_full_argmax(size: tuple[int, int]) -> None:
    """Labels are only resampled inside the box that can be foreground; the result must equal the
    argmax of fully resampled logits everywhere (ties within float rounding excepted)."""
    gen = torch.Generator().manual_seed(1)
    h, w = 64, 64
    logits = torch.randn(4, 3, h, w, generator=gen)
    logits[:, 0] += 6.0  # background wins almost everywhere ...
    logits[1, 1, 20:30, 10:25] += 9.0  # ... except a kidney blob
    logits[1, 2, 24:27, 14:18] += 14.0  # with a tumor in it
    logits[3, 2, 50:52, 40:41] += 12.0  # and a speck elsewhere in another slice
    up = _Upsampler((h, w), size, torch.device("cpu"))
    got = torch.zeros((4, *size), dtype=torch.uint8)
    conf_sum, conf_cnt = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    found = up.labels(logits, conf_sum, conf_cnt)
    assert found is not None
    (r0, r1), (q0, q1), lab = found
    assert (r1 - r0) * (q1 - q0) < size[0] * size[1] or size == (64, 64)
    got[:, r0:r1, q0:q1] = lab
    ref, gap = _reference_labels(logits, size)
    differ = got.long() != ref
    assert not bool((differ & (gap > 1e-4)).any())
    assert int(ref.eq(2).sum()) > 0 and int(ref.eq(1).sum()) > 0
    # Confidence: every foreground model-grid pixel counted once, with its softmax probability.
    prob, plab = torch.softmax(logits, dim=1).max(dim=1)
    for c in (1, 2):
        assert conf_cnt[c] == int(plab.eq(c).sum())
        assert float(conf_sum[c]) == pytest.approx(float(prob[plab == c].double().sum()))
    assert conf_cnt[0] == 0


@pytest.mark.parametrize("win", [((8, 40), (16, 48)), ((0, 24), (40, 64))])
def test_label_upsampling_of_a_window_equals_the_whole_grid(win: tuple[tuple[int, int], tuple[int, int]]) -> None:
    """The body crop's path: the logits of a window give the labels that the whole grid,
    background outside the window, gives; foreground up to the window's edge too."""
    (y0, y1), (x0, x1) = win
    gen = torch.Generator().manual_seed(2)
    full = torch.full((3, 3, 64, 64), -1e4)
    full[:, 0] = 0.0
    inner = torch.randn(3, 3, y1 - y0, x1 - x0, generator=gen)
    inner[:, 0] += 4.0
    inner[0, 1, 2:9, 3:12] += 9.0
    inner[2, 2, -3:, -4:] += 12.0  # foreground in the window's last rows and columns
    inner[1, 1, 0, 0] += 12.0  # and in its first pixel
    full[..., y0:y1, x0:x1] = inner
    up = _Upsampler((64, 64), (150, 170), torch.device("cpu"))
    z = torch.zeros(3, dtype=torch.float64)
    want = up.labels(full, z.clone(), z.clone())
    sums, cnts = z.clone(), z.clone()
    got = up.labels(inner, sums, cnts, (y0, x0))
    assert want is not None and got is not None
    assert got[:2] == want[:2]
    assert torch.equal(got[2], want[2]) and int((got[2] == 2).sum()) > 0
    want_sums, want_cnts = z.clone(), z.clone()
    up.labels(full, want_sums, want_cnts)
    torch.testing.assert_close(sums, want_sums)
    assert torch.equal(cnts, want_cnts)


def test_cropped_label_upsampling_all_background() -> None:
    logits = torch.zeros(2, 3, 32, 32)
    logits[:, 0] = 1.0
    z = torch.zeros(3, dtype=torch.float64)
    assert _Upsampler((32, 32), (100, 100), torch.device("cpu")).labels(logits, z, z.clone()) is None
    logits[1, 2, 5, 7] = 2.0  # a single pixel must be found
    found = _Upsampler((32, 32), (100, 100), torch.device("cpu")).labels(logits, z, z.clone())
    assert found is not None and int((found[2] == 2).sum()) > 0


@pytest.mark.parametrize(
    "layout", ["kits_ipl_fortran", "ras_fortran", "c_order", "big_endian_flipped", "uint16_flipped", "float64", "int64"]
)
def test_model_slices_layouts_agree(layout: str) -> None:
    """The slab reaches the model grid the same way whatever the stored memory order and dtype
    (torch converts native int and float dtypes, numpy the rest)."""
    rng = np.random.default_rng(0)
    base = rng.integers(-1024, 1500, size=(12, 40, 50)).astype(np.int16)  # canonical (Z, Y, X)
    if layout == "kits_ipl_fortran":  # slices fastest in memory, every axis flipped
        stored = np.asfortranarray(base[::-1, ::-1, ::-1])
        view = stored[::-1, ::-1, ::-1]
    elif layout in ("big_endian_flipped", "uint16_flipped"):  # as nibabel maps such files
        dtype = ">i2" if layout == "big_endian_flipped" else np.uint16
        stored = np.asfortranarray((base if dtype == ">i2" else base + 1024)[::-1, :, ::-1]).astype(dtype)
        view = stored[::-1, :, ::-1]
        base = view.astype(np.int32)  # type: ignore[assignment]
    elif layout in ("float64", "int64"):
        view = base.astype(layout).transpose(2, 1, 0).copy().transpose(2, 1, 0)
    elif layout == "ras_fortran":  # (X, Y, Z) Fortran: X fastest
        stored = np.asfortranarray(base.transpose(2, 1, 0))
        view = stored.transpose(2, 1, 0)
    else:
        view = np.ascontiguousarray(base)
    np.testing.assert_array_equal(view, base)
    pp = PreprocessConfig(target_spacing_mm=(1.6, 1.6), clip_hu=(-200.0, 300.0), mean=50.0, std=80.0)
    got = model_slices(view, (20, 31), pp, slope=2.0, inter=-10.0)
    ref_in = torch.from_numpy(base.astype(np.float32) * 2.0 - 10.0)[:, None]
    ref = normalize(F.interpolate(ref_in, size=(20, 31), mode="bilinear", align_corners=False), pp)[:, 0]
    assert got.shape == (12, 20, 31) and got.is_contiguous()
    # A flipped source is read in stored order and the result flipped back: the same up to the
    # float rounding of the resampling coordinates (1e-4 here is 0.008 HU).
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    # Converting into a caller's buffer gives the same slab, which doesn't share the buffer.
    buf = torch.full((view.size + 7,), float("nan"))
    again = model_slices(view, (20, 31), pp, slope=2.0, inter=-10.0, buffer=buf)
    torch.testing.assert_close(again, got, atol=0, rtol=0)
    buf.fill_(1e9)
    torch.testing.assert_close(again, got, atol=0, rtol=0)
    small = model_slices(view, (20, 31), pp, slope=2.0, inter=-10.0, buffer=torch.empty(10))  # too small: ignored
    torch.testing.assert_close(small, got, atol=0, rtol=0)


AIR_HU = -1000.0


def _with_air(hu: np.ndarray, aff: np.ndarray, rx: float = 48.0, ry: float = 34.0) -> np.ndarray:
    """Air outside an elliptic body around the test kidney (world x, y), as in a CT."""
    w = voxel_world(aff, hu.shape)  # type: ignore[arg-type]
    out = (w[..., 0] / rx) ** 2 + ((w[..., 1] + 6.0) / ry) ** 2 > 1.0
    hu = hu.copy()
    hu[out] = AIR_HU
    return hu


class _Spy(IntensityModel):
    """The intensity model, recording the height and width of every input it is given."""

    def __init__(self, config: UNetConfig, pp: PreprocessConfig) -> None:
        super().__init__(config, pp)
        self.seen: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((int(x.shape[-2]), int(x.shape[-1])))
        return super().forward(x)


def _spy_engine(pp: PreprocessConfig, body_crop: bool, mirror: bool = False) -> Engine:
    cfg = UNetConfig(in_slices=3, base_width=4, depth=3)
    meta = CheckpointMeta(cfg, pp, dict(KITS19_LABELS))
    return Engine(
        _Spy(cfg, pp),  # type: ignore[arg-type]
        meta,
        torch.device("cpu"),
        batch_size=4,
        precision="fp32",
        backend="torch",
        body_crop=body_crop,
        mirror=mirror,
    )


@pytest.mark.parametrize(
    ("name", "oblique", "spacing", "antialias"),
    [
        ("IPL", 0.0, None, False),
        ("RAS", 0.0, None, False),
        ("PSR", 0.0, None, False),
        ("LPS", 0.0, 1.6, False),
        ("IPL", 33.0, 1.6, False),
        ("IPL", 0.0, 2.5, True),
        ("LPS", 33.0, 1.6, True),
    ],
)
def test_body_crop_runs_the_network_on_the_body_and_keeps_the_mask(
    name: str, oblique: float, spacing: float | None, antialias: bool
) -> None:
    # A pointwise network gives the same logits inside the window whatever is cut away, so any
    # difference in the mask is a window placed in the wrong place on the way back.
    hu, aff, truth = make_volume(ORIENTATIONS[name], shape_ras=(160, 140, 12), oblique_deg=oblique)
    hu = _with_air(hu, aff)
    vol = Volume(hu, aff, nib.Nifti1Header(), (1.0, 1.0, 1.0))
    pp = dataclasses.replace(GEOM_PP, target_spacing_mm=(spacing, spacing) if spacing else None, antialias=antialias)
    masks, seen = {}, {}
    for crop in (False, True):
        eng = _spy_engine(pp, crop, mirror=True)
        masks[crop] = eng.predict(vol).mask
        seen[crop] = eng.model.seen  # type: ignore[attr-defined]  # the engine's own copy of the spy
    np.testing.assert_array_equal(masks[True], masks[False])
    if spacing is None and not oblique:
        np.testing.assert_array_equal(masks[True], truth)
    else:
        assert dice(masks[True] > 0, truth > 0) > (0.9 if spacing == 2.5 else 0.95)
    full = max(h * w for h, w in seen[False])
    cropped = max(h * w for h, w in seen[True])
    assert cropped < 0.75 * full, (seen[True][:2], seen[False][:2])
    assert len(seen[True]) == len(seen[False])  # every batch still runs, mirrored too


@pytest.mark.parametrize("layout", ["c_order", "kits_ipl_fortran"])
def test_body_box_finds_every_slice_above_the_floor(layout: str) -> None:
    lo = GEOM_PP.clip_hu[0]
    hu = np.full((5, 90, 70), -1000, dtype=np.int16)  # canonical (Z, Y, X)
    hu[2, 30:41, 25:33] = 40  # body in one slice only
    hu[4, 38, 50] = lo + 1  # barely above the floor still counts ...
    hu[1, 80, 3] = lo  # ... the floor itself does not

    def stored(a: np.ndarray) -> np.ndarray:  # the same canonical view, stored the KiTS way or plainly
        return np.asfortranarray(a[::-1, ::-1, ::-1])[::-1, ::-1, ::-1] if layout == "kits_ipl_fortran" else a

    assert body_box(stored(hu), lo) == ((30, 41), (25, 51))
    # Stored values are scaled first: 2 * v - 10 > -200 means v > -95.
    assert body_box(stored(hu), lo, slope=2.0, inter=-10.0) == ((30, 41), (25, 33))
    assert body_box(stored(-hu), lo, slope=-1.0) == ((30, 41), (25, 51))  # a negative slope
    assert body_box(stored(np.full((3, 20, 20), -1000, dtype=np.int16)), lo) is None
    assert body_box(stored(hu.astype(">i2")), lo) == ((30, 41), (25, 51))  # numpy's path


@pytest.mark.parametrize("size", [(90, 70), (45, 33), (131, 97)])
def test_body_crop_window_is_aligned_and_leaves_only_the_floor_outside(size: tuple[int, int]) -> None:
    """Outside the window every model-grid pixel must be exactly the clip's floor (what the
    network sees there is then the same as on the whole slice, and it is background), whatever
    the resampling; the body keeps BODY_MARGIN pixels of it inside the window."""
    eng = _spy_engine(GEOM_PP, True)
    m, mult = Engine.BODY_MARGIN, eng.meta.model.multiple
    floor = (GEOM_PP.clip_hu[0] - GEOM_PP.mean) / GEOM_PP.std
    hu = np.full((5, 90, 70), -1000, dtype=np.int16)
    hu[2, 30:41, 25:33] = 40
    hu[4, 38, 50] = GEOM_PP.clip_hu[0] + 1
    for near_edges in (False, True):
        if near_edges:
            hu[0, 2, 68] = 100
        body = body_box(hu, GEOM_PP.clip_hu[0])
        assert body is not None
        (y0, y1), (x0, x1) = eng._window(body, (90, 70), size)
        assert y0 % mult == 0 and x0 % mult == 0
        assert y1 % mult == 0 or y1 == size[0]
        assert x1 % mult == 0 or x1 == size[1]
        slab = model_slices(hu, size, GEOM_PP)
        outside = torch.ones(size, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert bool((slab[:, outside] == floor).all())
        above = (slab > floor).any(dim=0)
        rows, cols = torch.nonzero(above.any(dim=1)).flatten(), torch.nonzero(above.any(dim=0)).flatten()
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        assert r0 - y0 >= m or y0 == 0
        assert c0 - x0 >= m or x0 == 0
        assert y1 - r1 >= m or y1 == size[0]
        assert x1 - c1 >= m or x1 == size[1]
        if not near_edges:  # ... and not much more than that (one tap either side, then the pooling grid)
            assert r0 - y0 < m + mult + 2 and c0 - x0 < m + mult + 2 and y1 - r1 < m + mult + 2
        if size == (90, 70) and not near_edges:  # native: the box itself, grown and aligned
            assert (r0, r1, c0, c1) == (30, 41, 25, 51)
            assert y0 > 30 - m - mult and x0 > 25 - m - mult and y1 < 41 + m + mult and x1 < 51 + m + mult
        if near_edges:
            assert y0 == 0 and x1 == size[1]


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("layout", ["kits_ipl_fortran", "ras_fortran", "c_order", "big_endian_flipped"])
@pytest.mark.parametrize("size", [(13, 17), (20, 31), (40, 50), (77, 93)])
def test_model_slices_of_a_window_equal_the_whole_grid_cut(layout: str, size: tuple[int, int], antialias: bool) -> None:
    """The body crop converts and resamples only a window; it must equal the same window of the
    whole slices (torch's own resampling, antialiased or not), down- and upsampled, on flipped
    and unflipped axes."""
    rng = np.random.default_rng(3)
    base = rng.integers(-1024, 1500, size=(6, 40, 50)).astype(np.int16)  # canonical (Z, Y, X)
    if layout == "kits_ipl_fortran":
        view = np.asfortranarray(base[::-1, ::-1, ::-1])[::-1, ::-1, ::-1]
    elif layout == "ras_fortran":
        view = np.asfortranarray(base.transpose(2, 1, 0)).transpose(2, 1, 0)
    elif layout == "big_endian_flipped":
        view = np.asfortranarray(base[::-1, :, ::-1]).astype(">i2")[::-1, :, ::-1]
    else:
        view = base
    pp = PreprocessConfig(
        target_spacing_mm=(1.6, 1.6), clip_hu=(-900.0, 1400.0), mean=50.0, std=80.0, antialias=antialias
    )
    ref_in = torch.from_numpy(base.astype(np.float32) * 2.0 - 10.0)[:, None]
    ref, plain = (
        normalize(F.interpolate(ref_in, size=size, mode="bilinear", align_corners=False, antialias=aa), pp)[:, 0]
        for aa in (antialias, False)
    )
    if antialias and size[0] < 40:  # it shrinks: not the plain resampling
        assert not torch.allclose(ref, plain, atol=1e-2)
    h, w = size
    for (y0, y1), (x0, x1) in [((0, h), (0, w)), ((3, 11), (5, 17)), ((h - 4, h), (0, 3)), ((1, 2), (w - 1, w))]:
        got = model_slices(view, size, pp, slope=2.0, inter=-10.0, window=((y0, y1), (x0, x1)))
        assert got.shape == (6, y1 - y0, x1 - x0) and got.is_contiguous()
        # Values reach about 37 here; the antialiased path's matrix products round differently
        # from torch's kernel (up to about 1e-5 of the value).
        torch.testing.assert_close(got, ref[:, y0:y1, x0:x1], atol=5e-4 if antialias else 1e-4, rtol=1e-5)


def test_antialiased_resampling_averages_the_noise_away() -> None:
    """What it is for: shrinking 3x, plain bilinear reads 2 x 2 pixels and keeps most of white
    noise; antialiasing averages every pixel covered, about 3x less noise."""
    noise = np.random.default_rng(5).normal(0.0, 80.0, size=(4, 150, 150)).astype(np.float32) + 50.0
    pp = PreprocessConfig(target_spacing_mm=(3.0, 3.0), clip_hu=(-1000.0, 1000.0), mean=50.0, std=80.0)
    plain = float(model_slices(noise, (50, 50), pp).std())
    smooth = float(model_slices(noise, (50, 50), dataclasses.replace(pp, antialias=True)).std())
    assert plain > 0.6 and smooth < 0.45 * plain, (plain, smooth)
    # Where nothing shrinks there is nothing to average: the same slices either way.
    native = dataclasses.replace(pp, target_spacing_mm=None)
    torch.testing.assert_close(
        model_slices(noise, (150, 150), dataclasses.replace(native, antialias=True)),
        model_slices(noise, (150, 150), native),
        atol=0.0,
        rtol=0.0,
    )


@pytest.mark.parametrize("size", [(45, 33), (30, 23), (21, 70)])
def test_antialiased_body_crop_window_holds_every_pixel_the_body_reaches(
    size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The antialiased filter reads further than two taps; with no margin at all, the window
    must still hold every model pixel that isn't the floor."""
    monkeypatch.setattr(Engine, "BODY_MARGIN", 0)
    pp = dataclasses.replace(GEOM_PP, antialias=True)
    eng = _spy_engine(pp, True)
    floor = (pp.clip_hu[0] - pp.mean) / pp.std
    for y, x in [(30, 25), (31, 26), (33, 27), (34, 28), (36, 29), (58, 44), (61, 47)]:
        hu = np.full((2, 90, 70), -1000, dtype=np.int16)
        hu[1, y, x] = 400
        body = body_box(hu, pp.clip_hu[0])
        assert body is not None
        (y0, y1), (x0, x1) = eng._window(body, (90, 70), size)
        slab = model_slices(hu, size, pp)
        outside = torch.ones(size, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert bool((slab[:, outside] == floor).all()), ((y, x), size, (y0, y1, x0, x1))


def _unread(n_in: int, n_out: int) -> int:
    """The first input index that resampling ``n_in`` -> ``n_out`` pixels never reads."""
    i0, i1, _ = bilinear_taps(n_in, n_out)
    return min(set(range(n_in)) - set(i0.tolist()) - set(i1.tolist()))


def test_body_crop_of_a_body_no_model_pixel_reads_is_background() -> None:
    # 0.78 -> 2.0 mm skips some input rows: a chunk whose only tissue lies in such a row is read
    # by no model pixel, so the model grid is all floor there, and the chunk is background.
    pp = dataclasses.replace(GEOM_PP, target_spacing_mm=(2.0, 2.0))
    n = 128
    u = _unread(n, model_grid((n, n), (0.78, 0.78), pp)[0])
    hu = np.full((n, n, 4), -1000, dtype=np.int16)  # RAS: (X, Y, Z)
    hu[:, u, :] = 100  # canonical row u of every slice
    aff = np.diag([0.78, 0.78, 3.0, 1.0])
    eng = _spy_engine(pp, True)
    pred = eng.predict(Volume(hu, aff, nib.Nifti1Header(), (0.78, 0.78, 3.0)))
    assert not pred.mask.any()
    assert eng.model.seen == []  # type: ignore[attr-defined]
    whole = _spy_engine(pp, False).predict(Volume(hu, aff, nib.Nifti1Header(), (0.78, 0.78, 3.0)))
    np.testing.assert_array_equal(whole.mask, pred.mask)


@pytest.mark.parametrize("axis", [2, 3])
def test_label_upsampling_onto_a_coarser_grid_that_reads_no_candidate(axis: int) -> None:
    # Mapping back onto a coarser input grid skips some model pixels; a candidate only there
    # is read by no input pixel, which is background.
    u = _unread(128, 50)
    logits = torch.zeros(2, 3, 128, 128)
    logits[:, 0] = 5.0
    if axis == 2:
        logits[1, 2, u, 40] = 20.0
    else:
        logits[1, 2, 40, u] = 20.0
    z = torch.zeros(3, dtype=torch.float64)
    assert _Upsampler((128, 128), (50, 50), torch.device("cpu")).labels(logits, z, z.clone()) is None


@pytest.mark.parametrize(("norm", "crops"), [("batch", True), ("none", True), ("instance", False), ("group", False)])
def test_body_crop_only_for_networks_without_per_image_statistics(norm: str, crops: bool) -> None:
    cfg = UNetConfig(in_slices=3, base_width=8, depth=3, norm=norm)
    meta = CheckpointMeta(cfg, GEOM_PP, dict(KITS19_LABELS))
    eng = Engine(UNet(cfg), meta, torch.device("cpu"), precision="fp32", backend="torch", body_crop=True)
    assert eng.body_crop is crops
    assert Engine(UNet(cfg), meta, torch.device("cpu"), backend="torch", body_crop=False).body_crop is False


def test_all_air_is_background_without_running_the_network() -> None:
    hu, aff, _ = make_volume(ORIENTATIONS["IPL"])
    vol = Volume(np.full_like(hu, AIR_HU), aff, nib.Nifti1Header(), (1.0, 1.0, 1.0))
    eng = _spy_engine(GEOM_PP, True)
    seen_progress: list[tuple[int, int]] = []
    pred = eng.predict(vol, progress=lambda d, t: seen_progress.append((d, t)))
    assert not pred.mask.any()
    assert eng.model.seen == []  # type: ignore[attr-defined]
    assert seen_progress[-1] == (hu.shape[0], hu.shape[0])  # IPL: slices are the first axis
    assert pred.confidence == {1: 0.0, 2: 0.0}


def _interior_kidney_voxels(truth: np.ndarray, r: int = 2) -> list[tuple[int, int, int]]:
    """Kidney voxels whose whole (2r+1)^3 neighbourhood is kidney (no tumor, no background)."""
    out = []
    for i, j, k in np.argwhere(truth == 1):
        if min(i, j, k) >= r and (truth[i - r : i + r + 2, j - r : j + r + 1, k - r : k + r + 1] == 1).all():
            out.append((int(i), int(j), int(k)))
    return out


@pytest.mark.parametrize("name, oblique", [("IPL", 0.0), ("RAS", 0.0), ("LPS", 0.0), ("PSR", 0.0), ("IPL", 33.0)])
def test_engine_turns_tumor_specks_below_min_tumor_ml_into_kidney(name: str, oblique: float) -> None:
    hu, aff, truth = make_volume(ORIENTATIONS[name], oblique_deg=oblique)
    inner = _interior_kidney_voxels(truth)
    a = inner[0]
    b = next(v for v in inner if max(abs(p - q) for p, q in zip(v, a, strict=True)) >= 4)
    b2 = (b[0] + 1, b[1], b[2])
    for v in (a, b, b2):
        hu[v] = 320.0  # TUMOR_HU: a 1-voxel speck at a, a 2-voxel one at b
    vol = Volume(hu, aff, nib.Nifti1Header(), (1.0, 1.0, 1.0))  # header zooms are wrong on purpose
    voxel_ml = 1.0 * 1.2 * 2.5 / 1000  # make_volume's spacing; the engine must take it from the affine
    engine = _engine(GEOM_PP)
    before = engine.predict(vol).mask
    assert before[a] == 2 and before[b] == 2 and before[b2] == 2
    engine.meta = dataclasses.replace(engine.meta, postprocessing=PostprocessConfig(min_tumor_ml=1.5 * voxel_ml))
    after = engine.predict(vol).mask
    expected = truth.copy()
    expected[a] = 1  # below 1.5 voxels: kidney
    expected[b] = expected[b2] = 2  # 2 voxels: stays
    np.testing.assert_array_equal(after, expected)
    np.testing.assert_array_equal(after > 0, before > 0)  # the kidney region, and kidney Dice, don't change
