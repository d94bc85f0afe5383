"""Metrics: LPIPS(VGG16) plumbing with random weights, weight loading, and VLM effectiveness."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from csg.errors import InputError, WeightsMissingError
from csg.metrics import (
    LPIPS,
    LPIPS_HEADS_FILE,
    LPIPS_SCALE,
    LPIPS_SHIFT,
    VGG16_FILE,
    ConceptCheck,
    causal_consistency_score,
    effectiveness_score,
    load_lpips_vgg,
    lpips_distance,
    lpips_heads,
    masked_lpips_distance,
    preservation_score,
    read_judgement,
    verdict_rates,
    vgg16_features,
    vlm_effectiveness,
    weights_dir,
)
from csg.metrics import Judgement as MetricsJudgement


@pytest.fixture(scope="module")
def random_parts():
    torch.manual_seed(0)
    features, heads = vgg16_features(), lpips_heads()
    with torch.no_grad():
        for head in heads:  # LPIPS heads are non-negative channel weights
            head.weight.abs_()
    return features, heads


@pytest.fixture(scope="module")
def model(random_parts):
    return LPIPS(*random_parts)


@pytest.fixture(scope="module")
def weight_files(random_parts, tmp_path_factory):
    """The two files as their publishers ship them: torchvision's full VGG16 state dict and the
    lpips package's head names."""
    features, heads = random_parts
    folder = tmp_path_factory.mktemp("weights")
    vgg = {f"features.{k}": v for k, v in features.state_dict().items()}
    vgg["classifier.6.bias"] = torch.zeros(1000)  # a full torchvision checkpoint also holds the classifier
    torch.save(vgg, folder / VGG16_FILE)
    torch.save({f"lin{k}.model.1.weight": h.weight.detach().clone() for k, h in enumerate(heads)},
               folder / LPIPS_HEADS_FILE)
    return folder / VGG16_FILE, folder / LPIPS_HEADS_FILE


def images(n, seed, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- LPIPS ------------------------------------------------------------------------------------------

def reference_lpips(features, heads, x, y):
    """LPIPS v0.1 written straight from its definition, layer by layer with functional ops."""
    weights = features.state_dict()
    convs = sorted({int(k.split(".")[0]) for k in weights})
    shift = torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1)
    scale = torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1)

    def taps(img):
        h = ((img * 2 - 1) - shift) / scale
        out = []
        blocks = [convs[0:2], convs[2:4], convs[4:7], convs[7:10], convs[10:13]]
        for b, block in enumerate(blocks):
            if b:
                h = F.max_pool2d(h, 2)
            for i in block:
                h = F.relu(F.conv2d(h, weights[f"{i}.weight"], weights[f"{i}.bias"], padding=1))
            norm = torch.sqrt((h ** 2).sum(dim=1, keepdim=True))
            out.append(h / (norm + 1e-10))
        return out

    total = 0
    for head, fx, fy in zip(heads, taps(x), taps(y)):
        weighted = ((fx - fy) ** 2 * head.weight.view(1, -1, 1, 1)).sum(dim=1)
        total = total + weighted.mean(dim=(1, 2))
    return total


def test_matches_the_definition(random_parts, model):
    a, b = images(3, 1), images(3, 2)
    with torch.no_grad():
        expected = reference_lpips(*random_parts, a, b)
    assert torch.allclose(lpips_distance(model, a, b), expected, rtol=1e-4, atol=1e-7)


def test_identical_images_are_at_distance_zero(model):
    a = images(2, 3)
    assert torch.equal(lpips_distance(model, a, a.clone()), torch.zeros(2))


def test_symmetric_and_positive(model):
    a, b = images(2, 4), images(2, 5)
    ab, ba = lpips_distance(model, a, b), lpips_distance(model, b, a)
    assert torch.allclose(ab, ba, rtol=1e-5)
    assert (ab > 0).all()


def test_closer_images_are_closer(model):
    a = images(1, 6)
    noise = images(1, 7) - 0.5
    small = lpips_distance(model, a, (a + 0.05 * noise).clamp(0, 1))
    large = lpips_distance(model, a, (a + 0.8 * noise).clamp(0, 1))
    assert small < large


def test_batches_pair_row_by_row_and_a_single_image_broadcasts(model):
    a, b = images(3, 8), images(3, 9)
    batched = lpips_distance(model, a, b)
    one_by_one = torch.cat([lpips_distance(model, a[i], b[i]) for i in range(3)])
    assert batched.shape == (3,)
    assert torch.allclose(batched, one_by_one, rtol=1e-4, atol=1e-7)
    broadcast = lpips_distance(model, a[:1], b)
    assert torch.allclose(broadcast, torch.cat([lpips_distance(model, a[0], b[i]) for i in range(3)]),
                          rtol=1e-4, atol=1e-7)


def test_pil_images_match_tensors(model):
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (24, 40, 3), dtype=np.uint8) for _ in range(2)]
    as_pil = lpips_distance(model, Image.fromarray(pixels[0]), [Image.fromarray(pixels[1])])
    as_tensor = lpips_distance(model, *(torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in pixels))
    assert torch.allclose(as_pil, as_tensor, rtol=1e-5)


@pytest.mark.parametrize("a, b, fragment", [
    (torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 48), "one size"),
    (torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), "at least 16x16"),
    (torch.rand(1, 32, 32, 3), torch.rand(1, 32, 32, 3), "permute"),
    (torch.rand(2, 3, 32, 32) * 255, torch.rand(2, 3, 32, 32), r"\[0, 1\]"),
    (torch.rand(2, 3, 32, 32), torch.rand(3, 3, 32, 32), "cannot be paired"),
    (np.zeros((32, 32, 3)), torch.rand(1, 3, 32, 32), "PIL image"),
    ([Image.new("RGB", (32, 32)), Image.new("RGB", (16, 16))], torch.rand(2, 3, 32, 32), "different sizes"),
])
def test_bad_images_raise_a_clear_error(model, a, b, fragment):
    with pytest.raises(InputError, match=fragment):
        lpips_distance(model, a, b)


# -- weights --------------------------------------------------------------------------------------------

def test_loads_published_file_layouts_from_given_paths(model, weight_files):
    loaded = load_lpips_vgg(*weight_files)
    a, b = images(2, 10), images(2, 11)
    assert torch.allclose(lpips_distance(loaded, a, b), lpips_distance(model, a, b))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_finds_weights_under_torch_home(model, weight_files, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = weights_dir()
    assert folder == tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    for path in weight_files:
        (folder / path.name).symlink_to(path)
    a, b = images(1, 12), images(1, 13)
    assert torch.allclose(lpips_distance(load_lpips_vgg(), a, b), lpips_distance(model, a, b))


def test_missing_weights_name_each_file_and_where_it_goes(tmp_path, monkeypatch, weight_files):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsMissingError) as err:
        load_lpips_vgg()
    message = str(err.value)
    assert VGG16_FILE in message and LPIPS_HEADS_FILE in message
    assert str(tmp_path / "hub" / "checkpoints" / VGG16_FILE) in message
    assert "lpips/weights/v0.1/vgg.pth" in message
    with pytest.raises(WeightsMissingError) as err:
        load_lpips_vgg(vgg_weights=weight_files[0])
    assert VGG16_FILE not in str(err.value) and LPIPS_HEADS_FILE in str(err.value)
    with pytest.raises(WeightsMissingError, match="nowhere/vgg.pth"):
        load_lpips_vgg(vgg_weights=tmp_path / "nowhere" / "vgg.pth", lpips_weights=weight_files[1])
    assert issubclass(WeightsMissingError, FileNotFoundError)


def test_wrong_files_are_named(tmp_path, weight_files):
    vgg, heads = weight_files
    with pytest.raises(InputError, match="not a torchvision VGG16 state dict"):
        load_lpips_vgg(heads, heads)
    torch.save({"0.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "small_heads.pth")
    with pytest.raises(InputError, match="not an LPIPS v0.1 VGG heads file"):
        load_lpips_vgg(vgg, tmp_path / "small_heads.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="Could not read weights"):
        load_lpips_vgg(tmp_path / "garbage.pth", heads)


# -- VLM effectiveness ----------------------------------------------------------------------------------

def judge(verdict, *present):
    """A judge answer in the paper's JSON shape."""
    return {"intervention_id": "i1", "verdict": verdict, "reasoning": "...",
            "concept_checks": [{"concept_name": f"n{k}", "expected_value": "v", "present": p}
                               for k, p in enumerate(present)]}


@dataclass
class Check:
    present: bool


@dataclass
class Judgement:
    verdict: str
    checks: list


def test_effectiveness_is_the_mean_fraction_of_items_present():
    answers = [judge("success", "yes", "yes"), judge("partial", "yes", "no", "yes", "no"), judge("failure", "no")]
    assert vlm_effectiveness(answers) == pytest.approx((1 + 0.5 + 0) / 3)


def test_objects_and_bools_are_read_like_json():
    objects = [Judgement("success", [Check(True), Check(True)]), Judgement("partial", [Check(True), Check(False)])]
    dicts = [judge("success", "yes", "yes"), judge("partial", "YES", " no ")]
    assert vlm_effectiveness(objects) == vlm_effectiveness(dicts) == pytest.approx(0.75)


def test_empty_checklist_falls_back_to_the_verdict():
    assert vlm_effectiveness([judge("success"), judge("partial"), judge("failure")]) == pytest.approx(0.5)
    for verdict, score in (("success", 1.0), ("partial", 0.5), ("failure", 0.0)):  # one rule, wherever it is read
        judgement = read_judgement(judge(verdict))
        assert judgement.score == effectiveness_score(judgement) == preservation_score(judgement) == score
        assert vlm_effectiveness([judgement]) == vlm_effectiveness([judgement.to_dict()]) == score


def test_the_judges_type_is_the_one_the_metrics_read():
    from csg.vlm import judge as vlm_judge

    assert vlm_judge.Judgement is MetricsJudgement and vlm_judge.ConceptCheck is ConceptCheck
    answer = judge("partial", "yes", "no", "yes")
    read = read_judgement(answer)
    assert read.intervention_id == "i1" and read.reasoning == "..." and read.score == pytest.approx(2 / 3)
    assert [c.concept_name for c in read.concept_checks] == ["n0", "n1", "n2"]
    assert read_judgement(read.to_dict()) == read and read_judgement(read) is read


def test_verdict_rates():
    rates = verdict_rates([judge("success", "yes"), judge("Success", "yes"), judge("failure", "no"),
                           judge("partial", "yes", "no")])
    assert rates == {"success": 0.5, "partial": 0.25, "failure": 0.25}
    assert sum(rates.values()) == pytest.approx(1)


@pytest.mark.parametrize("answers, fragment", [
    ([], "no judgements"),
    ([judge("maybe", "yes")], "'verdict' must be one of"),
    ([{"concept_checks": []}], "'verdict' must be one of"),
    ([judge("success", "sometimes")], "judgement 0, check 0: 'present' must be yes or no"),
    ([judge("success", "yes"), judge("success", None)], "judgement 1, check 0"),
    ([{"verdict": "success", "concept_checks": "yes"}], "list of checks"),
])
def test_malformed_judgements_are_named(answers, fragment):
    with pytest.raises(InputError, match=fragment):
        vlm_effectiveness(answers)


# -- per-counterfactual scores of the evaluation ------------------------------------------------------

def test_masked_lpips_with_an_empty_mask_is_lpips_and_ignores_the_masked_region(model):
    a, b = images(2, seed=11, size=64)
    mask = torch.zeros(64, 64)
    assert masked_lpips_distance(model, a, b, mask) == pytest.approx(float(lpips_distance(model, a, b)[0]), rel=1e-5)
    mask[:, :32] = 1  # edit allowed in the left half: differences there no longer count
    changed_left = a.clone()
    changed_left[:, :, :24] = b[:, :, :24]  # 8 pixels short of the mask's edge: VGG's receptive field is wide
    inside = masked_lpips_distance(model, a, changed_left, mask)
    changed_right = a.clone()
    changed_right[:, :, 40:] = b[:, :, 40:]
    outside = masked_lpips_distance(model, a, changed_right, mask)
    assert inside < 0.5 * outside
    assert masked_lpips_distance(model, a, b, torch.ones(64, 64)) is None


def test_preservation_and_causal_consistency_count_the_right_checks():
    def judgement(*present):
        return {"verdict": "partial", "concept_checks": [{"present": "yes" if p else "no"} for p in present]}

    effect = judgement(True, False, True, True)  # target shown; descendants: no, yes, yes
    assert effectiveness_score(effect) == 0.75
    assert causal_consistency_score(effect, [True, False, False, False]) == pytest.approx(2 / 3)
    assert causal_consistency_score(judgement(True), [True]) is None  # no descendant changes
    assert preservation_score(judgement(True, True, False)) == pytest.approx(2 / 3)
    assert preservation_score({"verdict": "partial", "concept_checks": []}) == 0.5  # the one empty-checklist rule
    with pytest.raises(InputError, match="edit concepts"):
        causal_consistency_score(effect, [True])
