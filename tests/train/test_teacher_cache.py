"""The teacher-embedding cache: equals live teacher outputs, is reused, is invalidated by teacher or data changes."""

from dataclasses import replace

import torch

from edgekd.data.synthetic import SyntheticIdentities
from edgekd.data.transforms import hflip, normalize
from edgekd.distill.pipeline import build_trainee
from edgekd.losses import LossWeights
from edgekd.train.config import TrainConfig
from edgekd.train.loop import fit
from edgekd.train.teacher import Teacher
from edgekd.train.teacher_cache import build_teacher_cache

CFG = TrainConfig(model="r_tiny", batch_size=16, steps=4, compile=False, device="cpu", log_every=1)


def _teacher(dataset, seed=0):
    return build_trainee(replace(CFG, seed=seed), dataset).backbone.eval()


def test_cache_equals_live_teacher_for_images_and_flips(tiny_faces, tmp_path, network_atol):
    teacher = _teacher(tiny_faces)
    mean, std = teacher.cfg.mean, teacher.cfg.std
    cache = build_teacher_cache(teacher, tiny_faces, mean, std, tmp_path, torch.device("cpu"), batch_size=24)
    indices = torch.tensor([0, 5, 23, 63])
    images = torch.stack([tiny_faces[i][0] for i in indices.tolist()])
    x = normalize(images, mean, std)
    with torch.no_grad():
        live, live_flip = teacher(x), teacher(hflip(x))
    # The cache ran the teacher in batches of 24, the live call in one of 4: the same float32 network with other sum
    # orders, within network_atol (tests/conftest.py: 8 ulps per Conv/Linear layer of the largest embedding entry).
    for flip, want in ((False, live), (True, live_flip)):
        got = cache.lookup(indices, torch.full((4,), flip))
        torch.testing.assert_close(got, want, rtol=0, atol=network_atol(teacher, want))


def test_cache_is_reused_and_invalidated(tiny_faces, tmp_path):
    teacher = _teacher(tiny_faces)
    mean, std = teacher.cfg.mean, teacher.cfg.std
    first = build_teacher_cache(teacher, tiny_faces, mean, std, tmp_path, torch.device("cpu"))
    stamp = first.path.stat().st_mtime_ns
    again = build_teacher_cache(teacher, tiny_faces, mean, std, tmp_path, torch.device("cpu"))
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp  # reused, not rewritten

    with torch.no_grad():
        next(teacher.parameters()).add_(0.01)  # the teacher changed: a new cache
    changed_teacher = build_teacher_cache(teacher, tiny_faces, mean, std, tmp_path, torch.device("cpu"))
    assert changed_teacher.path != first.path

    other_data = SyntheticIdentities(identities=8, images_per_identity=8, image_size=32, seed=1)
    changed_data = build_teacher_cache(teacher, other_data, mean, std, tmp_path, torch.device("cpu"))
    assert changed_data.path not in (first.path, changed_teacher.path)

    changed_norm = build_teacher_cache(teacher, tiny_faces, (0.4,) * 3, std, tmp_path, torch.device("cpu"))
    assert changed_norm.path != changed_teacher.path


def test_training_with_cache_equals_training_with_live_teacher(tiny_faces, tmp_path):
    teacher = build_trainee(replace(CFG, seed=5), tiny_faces)
    teacher.backbone.eval()
    head = teacher.head.freeze()
    cache = build_teacher_cache(
        teacher.backbone, tiny_faces, teacher.cfg.mean, teacher.cfg.std, tmp_path / "c", torch.device("cpu")
    )
    weights = LossWeights(ce=1, th_ce=1, th_kd=1, l2e=1)
    results = []
    for name, frozen in (
        ("live", Teacher(teacher.backbone, head)),
        ("cached", Teacher(teacher.backbone, head, cache=cache)),
    ):
        student = build_trainee(replace(CFG, model="mbf_tiny", seed=2), tiny_faces)
        fit(student, replace(CFG, model="mbf_tiny"), weights, tiny_faces, tmp_path / name, teacher=frozen)
        results.append(student.backbone.state_dict())
    # The cached embeddings equal the live ones up to the rounding of other batch splits (≲ 1e-6 relative: the test
    # above), which moves each step's gradient by about as much relative; 4 SGD steps at lr 0.1 (clipped at 5, momentum
    # 0.9) pass that to the weights as ≲ 1e-6 of their update, far inside 1e-4 relative + 1e-5 absolute.
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-4, atol=1e-5)


def test_live_teacher_sees_its_own_normalization(tiny_faces, tmp_path):
    # A teacher with other mean/std than the student (a timm teacher and a face student, say) must get the same
    # embeddings live as through the cache, which always normalizes with the teacher's own statistics.
    teacher = build_trainee(replace(CFG, seed=5), tiny_faces)
    teacher.backbone.eval()
    object.__setattr__(teacher.backbone, "cfg", replace(teacher.backbone.cfg, mean=(0.3, 0.4, 0.5), std=(0.2,) * 3))
    head = teacher.head.freeze()
    cache = build_teacher_cache(
        teacher.backbone, tiny_faces, teacher.cfg.mean, teacher.cfg.std, tmp_path / "c", torch.device("cpu")
    )
    weights = LossWeights(ce=1, th_ce=1, l2e=1)
    results = []
    for name, frozen in (
        ("live", Teacher(teacher.backbone, head)),
        ("cached", Teacher(teacher.backbone, head, cache=cache)),
    ):
        student = build_trainee(replace(CFG, model="mbf_tiny", seed=2), tiny_faces)
        fit(student, replace(CFG, model="mbf_tiny", steps=2), weights, tiny_faces, tmp_path / name, teacher=frozen)
        results.append(student.backbone.state_dict())
    for key, value in results[0].items():  # 2 steps: the bound of the test above
        torch.testing.assert_close(results[1][key], value, rtol=1e-4, atol=1e-5)


def test_teacher_embeds_with_its_own_normalization_and_flips_live_and_cached(tiny_faces, tmp_path, network_atol):
    """``Teacher.embed`` normalizes with the teacher's statistics (not the student's) and mirrors where asked, live
    and from its cache alike; the cached teacher never runs its backbone."""
    backbone = _teacher(tiny_faces)
    mean, std = (0.3, 0.4, 0.5), (0.2,) * 3
    object.__setattr__(backbone, "cfg", replace(backbone.cfg, mean=mean, std=std))
    live = Teacher(backbone).to(torch.device("cpu"))
    cached = live.with_cache(tiny_faces, tmp_path, torch.device("cpu"))
    indices, flips = torch.tensor([3, 9, 40, 63]), torch.tensor([False, True, True, False])
    images = torch.stack([tiny_faces[i][0] for i in indices.tolist()])
    x = normalize(images, mean, std)
    with torch.no_grad():
        expected = torch.where(flips[:, None], backbone(hflip(x)), backbone(x))
    # Live: bit for bit. Normalizing and mirroring are exact per pixel, and the backbone runs one batch of 4 as the
    # expected values do: the same kernels on the same shapes, each row's sums depending on its own row only.
    torch.testing.assert_close(live.embed(images, indices, flips), expected, rtol=0, atol=0)
    cached.backbone = None  # a cached teacher must not need its backbone
    # Cached: computed in the cache's batches, not in one of 4: other sum orders (network_atol, tests/conftest.py).
    torch.testing.assert_close(
        cached.embed(images, indices, flips), expected, rtol=0, atol=network_atol(backbone, expected)
    )
    assert (live.mean, live.std) == (mean, std) and live.cache is None and cached.cache is not None
