"""Seeds and noise: A1111 batch seeds, CPU/NV sources, variation seeds, seed resize, ENSD."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdstudio.errors import InvalidRequestError
from sdstudio.sampling.philox import PhiloxGenerator, philox4x32
from sdstudio.sampling.rng import ImageRNG, batch_seeds, randn, random_seed, resolve_seed, slerp

SHAPE = (4, 8, 8)  # a 64x64-pixel SD latent


def torch_cpu_draws(seed: int, shape, count: int) -> list[torch.Tensor]:
    """Reference: ``count`` successive torch.randn draws from one seeded CPU generator."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


# --- Philox4x32-10 and the NV source ------------------------------------------------------------

# Random123 tests/kat_vectors (github.com/DEShawResearch/random123), the three "philox4x32 10" lines:
# counter[4], key[2] -> output[4].
RANDOM123_PHILOX4X32_10 = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", RANDOM123_PHILOX4X32_10)
def test_philox4x32_10_matches_random123_known_answers(counter, key, expected):
    words = philox4x32(np.array(counter, dtype=np.uint32).reshape(4, 1), key)
    assert [int(w) for w in words[:, 0]] == list(expected)


def test_philox4x32_is_vectorised_over_counters():
    counters = np.zeros((4, 3), dtype=np.uint32)
    counters[2] = [0, 1, 2]
    batched = philox4x32(counters, (7, 9))
    for i in range(3):
        np.testing.assert_array_equal(batched[:, i], philox4x32(counters[:, i:i + 1], (7, 9))[:, 0])


def test_nv_matches_a1111_rng_philox_docstring():
    # "Expected output" printed in AUTOMATIC1111/stable-diffusion-webui modules/rng_philox.py for
    # Generator(seed=0).randn(shape=(3, 4)). The module's own float32-rounded cuRAND constants give values
    # up to ~2e-7 away from these 8-decimal prints, hence the tolerance.
    expected = np.array([[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                         [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                         [-1.07454231, -0.36314407, -1.67105067, 2.26550497]])
    noise = randn(0, (3, 4), source="NV")
    assert noise.dtype == torch.float32 and noise.device.type == "cpu"
    np.testing.assert_allclose(noise.numpy(), expected, atol=1e-6, rtol=0)


# Real CUDA output, float32: kapilsh/cuda-mode-lecture kernels/triton_fused_add_mul_relu.py (commit 7e512fc8)
# runs torch.manual_seed(0); a = torch.randn((8, 8), device="cuda"); b = torch.randn((8, 8), device="cuda");
# c = torch.randn((1, 8), device="cuda"), and its blog post "CUDA Mode - Fusing Kernels Talk" (2024-05-30)
# prints "Input" = a and "Expected Output" = relu(a + 0.5 * b + c), 4 decimals.
CUDA_SEED0_8X8 = [
    [-0.9247, -0.4253, -2.6438, 0.1452, -0.1209, -0.5797, -0.6229, -0.3284],
    [-1.0745, -0.3631, -1.6711, 2.2655, 0.3117, -0.1842, 1.2866, 1.1820],
    [-0.1271, 1.2169, 1.4353, 1.0605, -0.4941, -1.4244, -0.7244, -1.2973],
    [0.0697, -0.0074, 1.8969, 0.6878, -0.0779, -0.8373, 1.3506, -0.2879],
    [-0.5965, -0.3283, -0.9086, -0.8059, -0.7407, -0.0504, 0.5435, 1.5150],
    [0.0141, 0.4532, 1.6349, 0.7124, -0.1806, 1.0252, -1.4622, -0.7554],
    [-0.1836, 0.3824, 0.3918, -0.0830, 0.8971, -1.1123, 0.1116, 0.4863],
    [-0.5499, -0.3231, -0.5469, 0.9049, 0.2837, 0.1210, 0.4730, -1.0823],
]
CUDA_SEED0_RELU_A_HALF_B_C = [
    [1.7098, 0.0, 0.0, 0.0, 6.7049e-01, 0.0, 3.4424e-01, 1.1223e-02],
    [1.8750, 0.0, 0.0, 2.2105, 6.6808e-01, 0.0, 1.8445, 1.9246],
    [2.2614, 1.3964, 5.1802e-01, 2.0114, 0.0, 0.0, 2.7715e-01, 0.0],
    [2.4750, 0.0, 1.9079, 5.4869e-01, 3.7923e-01, 0.0, 3.1791, 6.6843e-01],
    [1.8234, 0.0, 1.1147e-01, 0.0, 0.0, 0.0, 2.4250, 3.2593],
    [2.2903, 0.0, 1.1721, 6.9331e-01, 1.0583, 6.7518e-01, 0.0, 2.6185e-01],
    [1.5804, 0.0, 9.0740e-01, 1.6670e-01, 5.5230e-02, 0.0, 1.5325, 3.5984e-01],
    [1.5554, 0.0, 0.0, 9.4380e-01, 2.9795e-03, 7.4125e-02, 1.6286, 0.0],
]


def test_nv_first_draw_matches_cuda_torch_randn():
    np.testing.assert_allclose(randn(0, (8, 8), source="NV").numpy(), CUDA_SEED0_8X8, atol=6e-5, rtol=0)


def test_nv_continued_draws_match_cuda_generator_offset():
    # Each CUDA randn call advances the generator: draws 2 and 3 must match the published combination.
    generator = PhiloxGenerator(0)
    a, b, c = generator.randn((8, 8)), generator.randn((8, 8)), generator.randn((1, 8))
    np.testing.assert_allclose(np.maximum(a + 0.5 * b + c, 0), CUDA_SEED0_RELU_A_HALF_B_C, atol=2e-4, rtol=0)


def test_nv_continuation_is_a_new_counter_block_not_the_tail_of_a_long_draw():
    # A1111/cuRAND: draw k uses counter word 0 = k, element i uses counter word 2 = i; so a second draw
    # restarts the element index instead of continuing a longer first draw.
    generator = PhiloxGenerator(5)
    generator.randn((16,))
    second = generator.randn((16,))
    long_draw = PhiloxGenerator(5).randn((32,))
    assert not np.allclose(second, long_draw[16:])
    assert not np.allclose(second, long_draw[:16])


def test_nv_seed_is_split_into_low_and_high_key_words():
    # A 64-bit seed 2**32 + 1 differs from seed 1 only in the high key word; both must be used.
    assert not torch.equal(randn(1, (16,), "NV"), randn(2**32 + 1, (16,), "NV"))
    assert torch.equal(randn(-1, (16,), "NV"), randn(2**64 - 1, (16,), "NV"))  # torch's two's complement


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU source uses the real CUDA generator here")
def test_gpu_source_without_cuda_is_the_nv_emulation():
    np.testing.assert_allclose(randn(0, (8, 8), source="GPU").numpy(), CUDA_SEED0_8X8, atol=6e-5, rtol=0)
    assert torch.equal(randn(123, SHAPE, "GPU"), randn(123, SHAPE, "NV"))


# --- CPU source, per-image generators, ENSD -----------------------------------------------------

def test_cpu_source_equals_seeded_torch_randn():
    assert torch.equal(randn(1234, SHAPE, "CPU"), torch_cpu_draws(1234, SHAPE, 1)[0])


def test_unknown_source_and_seed_out_of_range_are_rejected():
    with pytest.raises(InvalidRequestError, match="randn_source"):
        randn(1, SHAPE, "TPU")
    with pytest.raises(InvalidRequestError, match="seed"):
        randn(2**64, SHAPE, "CPU")


@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_batch_image_equals_the_same_seed_alone(source):
    noise = ImageRNG(SHAPE, [100, 101, 102], source=source).first()
    assert noise.shape == (3, *SHAPE) and noise.dtype == torch.float32
    for i in range(3):
        assert torch.equal(noise[i], randn(100 + i, SHAPE, source))


def test_next_continues_each_image_generator():
    rng = ImageRNG(SHAPE, [7, 8], source="CPU")
    draws = [rng.next(), rng.next(), rng.next()]  # the first next() is first(), as in A1111
    for i, seed in enumerate([7, 8]):
        expected = torch_cpu_draws(seed, SHAPE, 3)
        for step in range(3):
            assert torch.equal(draws[step][i], expected[step])


def test_first_then_next_equals_one_generator_drawing_twice_nv():
    rng = ImageRNG(SHAPE, [42], source="NV")
    first, second = rng.first(), rng.next()
    generator = PhiloxGenerator(42)
    np.testing.assert_array_equal(first[0].numpy(), generator.randn(SHAPE))
    np.testing.assert_array_equal(second[0].numpy(), generator.randn(SHAPE))


def test_ensd_reseeds_generators_after_the_first_draw():
    rng = ImageRNG(SHAPE, [10, 11], source="CPU", eta_noise_seed_delta=31337)
    first, second, third = rng.first(), rng.next(), rng.next()
    for i, seed in enumerate([10, 11]):
        assert torch.equal(first[i], torch_cpu_draws(seed, SHAPE, 1)[0])
        after = torch_cpu_draws(seed + 31337, SHAPE, 2)
        assert torch.equal(second[i], after[0])
        assert torch.equal(third[i], after[1])


def test_noise_sampler_hands_out_the_next_draws():
    rng = ImageRNG(SHAPE, [3], source="CPU")
    rng.first()
    sigma = torch.tensor(1.0)
    assert torch.equal(rng.noise_sampler(sigma, sigma), torch_cpu_draws(3, SHAPE, 2)[1].unsqueeze(0))


# --- slerp and variation seeds ------------------------------------------------------------------

def reference_vector_slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Textbook slerp of two 1-D vectors (Shoemake 1985), weights from the angle between their directions."""
    omega = math.acos(float(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b))))
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def test_slerp_interpolates_each_column_along_height():
    low, high = torch_cpu_draws(1, SHAPE, 2)
    result = slerp(0.3, low, high)
    for c, w in [(0, 0), (2, 5), (3, 7)]:
        expected = reference_vector_slerp(0.3, low[c, :, w].double().numpy(), high[c, :, w].double().numpy())
        np.testing.assert_allclose(result[c, :, w].numpy(), expected, atol=1e-5)


def test_slerp_endpoints():
    low, high = torch_cpu_draws(2, SHAPE, 2)
    torch.testing.assert_close(slerp(0.0, low, high), low)
    torch.testing.assert_close(slerp(1.0, low, high), high)


def test_slerp_near_parallel_uses_a1111_linear_branch_as_written():
    low = torch_cpu_draws(3, SHAPE, 1)[0]
    high = low * 2.0 + 1e-4 * torch_cpu_draws(4, SHAPE, 1)[0]  # same directions: cosine ~ 1
    torch.testing.assert_close(slerp(0.25, low, high), low * 0.25 + high * 0.75)


def test_variation_seed_slerps_toward_the_subseed_noise():
    seeds, subseeds = [5, 5], [20, 21]
    noise = ImageRNG(SHAPE, seeds, subseeds, subseed_strength=0.4, source="CPU").first()
    for i in range(2):
        torch.testing.assert_close(noise[i], slerp(0.4, randn(5, SHAPE, "CPU"), randn(subseeds[i], SHAPE, "CPU")))


def test_zero_strength_ignores_subseeds_and_missing_subseeds_are_zero():
    plain = ImageRNG(SHAPE, [5], [20], subseed_strength=0.0, source="CPU").first()
    assert torch.equal(plain[0], randn(5, SHAPE, "CPU"))
    padded = ImageRNG(SHAPE, [5, 6], [20], subseed_strength=0.5, source="CPU").first()
    torch.testing.assert_close(padded[1], slerp(0.5, randn(6, SHAPE, "CPU"), randn(0, SHAPE, "CPU")))


# --- seed resize --------------------------------------------------------------------------------

def test_seed_resize_from_the_target_size_is_plain_noise():
    noise = ImageRNG(SHAPE, [9], seed_resize_from_h=64, seed_resize_from_w=64, source="CPU").first()
    assert torch.equal(noise[0], randn(9, SHAPE, "CPU"))


def test_seed_resize_from_smaller_pastes_the_small_noise_in_the_centre():
    target_shape = (4, 12, 16)  # 128x96 px
    rng = ImageRNG(target_shape, [9], seed_resize_from_h=64, seed_resize_from_w=64, source="CPU")
    noise = rng.first()[0]
    small, plain = randn(9, SHAPE, "CPU"), randn(9, target_shape, "CPU")
    assert torch.equal(noise[:, 2:10, 4:12], small)  # (12-8)/2 rows, (16-8)/2 columns in
    outside = torch.ones(target_shape, dtype=torch.bool)
    outside[:, 2:10, 4:12] = False
    assert torch.equal(noise[outside], plain[outside])
    # The image's generator drew one target-sized tensor, so the next draw is its second.
    assert torch.equal(rng.next()[0], torch_cpu_draws(9, target_shape, 2)[1])


def test_seed_resize_from_larger_takes_the_centre_crop():
    rng = ImageRNG(SHAPE, [9], seed_resize_from_h=96, seed_resize_from_w=128, source="CPU")
    large = randn(9, (4, 12, 16), "CPU")
    assert torch.equal(rng.first()[0], large[:, 2:10, 4:12])


# --- seeds --------------------------------------------------------------------------------------

def test_random_seed_range():
    seeds = {random_seed() for _ in range(2000)}
    assert all(0 <= s < 4294967294 for s in seeds)
    assert len(seeds) > 1990  # 2000 draws from 2**32 values almost never repeat
    assert max(seeds) > 2**31  # covers the upper half, not just a signed 31-bit range


@pytest.mark.parametrize("value", [-1, None, "", "-1", "not a number"])
def test_resolve_seed_randomises_unset_values(value):
    assert 0 <= resolve_seed(value) < 4294967294


@pytest.mark.parametrize("value, expected", [(0, 0), (123, 123), ("456", 456), (" 789 ", 789), (-5, -5)])
def test_resolve_seed_keeps_given_values(value, expected):
    assert resolve_seed(value) == expected


def test_batch_seeds_follow_a1111_all_seeds():
    assert batch_seeds(10, 20, 0.0, 3) == ([10, 11, 12], [20, 21, 22])
    assert batch_seeds(10, 20, 0.5, 3) == ([10, 10, 10], [20, 21, 22])
    seeds, subseeds = batch_seeds(-1, None, 0.0, 4)
    assert seeds == [seeds[0] + i for i in range(4)] and subseeds == [subseeds[0] + i for i in range(4)]
