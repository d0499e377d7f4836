"""3×3 convolutions of the CPU fast paths by Winograd's minimal filtering F(m×m, 3×3): bf16 (AMX / AVX512-BF16) and
fp32 (`--precision auto` on CPUs without native bf16 math).

A UNet step (and a VAE decode) is mostly 3×3 convolutions, and oneDNN already runs them near these cores' peak, so
only less arithmetic makes them faster. Winograd computes each m×m output tile from an (m+2)² input tile as (m+2)²
independent products over channels: 4 products per output instead of 9 for F(2×2, 3×3), 2.25 for F(4×4, 3×3).
The tile follows the dtype (OUTPUT_TILES): bf16 takes F(2×2) (per-layer error 1.9× the direct bf16 convolution's: its
8 bits of mantissa leave no room for F(4×4)'s larger transforms, 7×); fp32 takes F(4×4), whose error stays at
2–3e-6 (the direct fp32 convolution's: 1e-6), so the fp32 fast path is near-exact. In steps:

1. input transform: every (m+2)² tile of the zero-padded input, d → Bᵀ·d·B, in fp32, stored in the dtype as
   V[(m+2)², tiles, channels in];
2. weight transform: every 3×3 filter g → G·g·Gᵀ, stored in the dtype as U[(m+2)², channels out, channels in] (done
   per call from the layer's current weight, so a LoRA patch needs nothing and no second copy of the weights stays);
3. (m+2)² matrix products V[i]·U[i]ᵀ by oneDNN (torch.bmm), the bulk of the time;
4. output transform: Aᵀ·M·A per tile in fp32, plus the bias, written into the channels-last output.

The transforms are C loops over channels (vectorised by the compiler), generated from the matrices below and
compiled once per machine and dtype (models/native.py). Where there is no compiler, and for any convolution outside
the narrow case (another dtype or device, gradients, channels not a multiple of 16, too few channels or tiles to pay
for the transforms), and on a machine where Winograd does not beat the direct convolution (`winograd_pays`, measured
once per machine and dtype: models/tuning.py), the layer runs oneDNN's direct convolution as before — except small
bf16 images (too few tiles) of shapes where one matrix product over the unfolded neighbourhoods was measured faster
(`unfolded_pays`). Only models built for a fast path get these layers (models/build.py): the fp32 reference stays
torch's own.
"""
from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from sdstudio.models.half_weights import weight_for
from sdstudio.models.native import (SCALAR_LOADS, SCALAR_TYPES, compiled_library, release_kernel_buffers,
                                    releasing_buffers, scratch)
from sdstudio.models.tuning import candidate_pays

OUTPUT_TILES = {torch.bfloat16: 2, torch.float32: 4}   # per dtype: the output tile m of its F(m×m, 3×3)
# per output tile m: the Toom-Cook interpolation points (and ∞) of F(m×m, 3×3)
INTERPOLATION_POINTS = {2: (0.0, 1.0, -1.0),
                        4: (0.0, 1.0, -1.0, 0.5, -2.0)}   # error 1.7e-6 (±2: 2.6e-6, ±½: 2.6e-6)
C_TYPES = {dtype: c_type for dtype, (_, c_type) in SCALAR_TYPES.items()}
SUFFIXES = {dtype: suffix for dtype, (suffix, _) in SCALAR_TYPES.items()}   # of the C loads and functions
# per dtype: the weight dtypes its weight transform reads (the fast fp32 path keeps fp16 and bf16 files' weights in
# their 16-bit dtype: models/half_weights.py; `--precision auto` the file's weights of the 3×3 convolutions it packs
# to int8: models/int8_winograd.py)
WEIGHT_TYPES = {torch.bfloat16: (torch.bfloat16, torch.float16, torch.float32),
                torch.float32: (torch.float32, torch.float16, torch.bfloat16)}
NAMES = {torch.bfloat16: "winograd", torch.float32: "winograd-fp32"}   # of each dtype's kernels and tuning choice
CHANNEL_BLOCK = 16     # channels per vector loop in the C transforms; channel counts must be multiples of it
# narrower layers do not pay: bf16's the VAE's 128-channel ones at 512² (198 vs 188 ms direct); fp32 F(4×4)'s are
# 1.3–1.9× faster there, 64 channels at 256² 1.1×
MIN_CHANNELS = {torch.bfloat16: 256, torch.float32: 128}
# fewer output tiles do not pay for the weight transform (per call, 16/9 of the weight in bf16, 4× in fp32): SD1.5's
# 8×8 level, 32 bf16 tiles with CFG, 8 fp32 ones (1280 → 1280 fp32: 0.56–1.5× the direct convolution's speed from
# one process to the next; its 16×16 level, 32 fp32 tiles: 1.25–2.2×)
MIN_TILES = {torch.bfloat16: 128, torch.float32: 16}
# at most this much transformed input (a part of the tiles) and transformed weight (a part of the output channels) at
# once: bounds the buffers (the transformed input is 4× the input in bf16, 2.25× in fp32). fp32's (36 values per
# tile and channel, 4 bytes each) needs more to keep a layer's tiles in one pass: 1920 → 640 at 32², fp32, 198 ms
# with 16 MiB, 86 with 64
CHUNK_BYTES = {torch.bfloat16: 16 << 20, torch.float32: 64 << 20}


def winograd_matrices(m: int, points: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    """Aᵀ (m × n), G (n × 3), Bᵀ (n × n), n = m + 2, float64, for F(m, 3) with the given finite points and ∞:
    Aᵀ·[(G·g) ⊙ (Bᵀ·d)] is the correlation of d (n values) with g (3 values). Aᵀ and G follow from the points
    (Lagrange interpolation); Bᵀ is solved from that identity."""
    n = m + 2
    p = torch.tensor(points, dtype=torch.float64)
    a_t = torch.zeros(m, n, dtype=torch.float64)
    a_t[:, :n - 1] = p ** torch.arange(m, dtype=torch.float64)[:, None]
    a_t[m - 1, n - 1] = 1
    g = torch.zeros(n, 3, dtype=torch.float64)
    for j in range(n - 1):
        g[j] = p[j] ** torch.arange(3, dtype=torch.float64) / torch.prod(p[j] - torch.cat([p[:j], p[j + 1:]]))
    g[n - 1, 2] = 1
    # Σ_j Aᵀ[i, j]·G[j, k]·Bᵀ[j, a] = [a = i + k] for every output i, filter tap k and input a
    equations = torch.einsum("ij,jk,jb,ac->ikabc", a_t, g, torch.eye(n, dtype=torch.float64),
                             torch.eye(n, dtype=torch.float64)).reshape(m * 3 * n, n * n)
    wanted = torch.tensor([float(a == i + k) for i in range(m) for k in range(3) for a in range(n)],
                          dtype=torch.float64)
    b_t = torch.linalg.lstsq(equations, wanted[:, None]).solution.reshape(n, n).round(decimals=12)
    return a_t, g, b_t


def winograd_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    row_padding: int = 1) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=(row_padding, 1)) for bf16 or fp32 CPU tensors (3×3 weight of one of the
    dtype's WEIGHT_TYPES, read as it is), channels-last output, by F(m×m, 3×3); row_padding 0 = x brings the rows
    above and below the output (a strip with its halo). The caller checks `winograd_applies` first."""
    kernels = _kernels(x.dtype)
    batch, channels, rows_in, width = x.shape
    height = rows_in - 2 + 2 * row_padding   # output rows
    out_channels = weight.shape[0]
    m = OUTPUT_TILES[x.dtype]
    n = m + 2
    rows, cols = -(-height // m), -(-width // m)
    tiles = batch * rows * cols
    x = x.contiguous(memory_format=torch.channels_last)
    weight = weight.contiguous(memory_format=torch.channels_last)
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(batch, out_channels, height, width, dtype=x.dtype, memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    weight_transform = getattr(kernels, f"weight_transform_{SUFFIXES[weight.dtype]}")
    per_channel = n * n * channels * x.element_size()
    chunk = CHUNK_BYTES[x.dtype]
    span = max(1, min(tiles, chunk // per_channel))     # tiles per pass
    block = min(out_channels, max(CHANNEL_BLOCK, chunk // per_channel // CHANNEL_BLOCK * CHANNEL_BLOCK))
    for low in range(0, out_channels, block):                 # output channels per pass
        high = min(low + block, out_channels)
        u = scratch("weight", (n * n, high - low, channels), x.dtype)
        weight_transform(weight[low:].data_ptr(), u.data_ptr(), high - low, channels, threads)
        for first in range(0, tiles, span):
            count = min(span, tiles - first)
            v = scratch("input", (n * n, count, channels), x.dtype)
            if low == 0 or span < tiles:                      # one pass over all tiles keeps its input
                kernels.input_transform(x.data_ptr(), v.data_ptr(), batch, rows_in, width, channels, row_padding,
                                        rows, cols, first, count, threads)
            products = scratch("products", (n * n, count, high - low), x.dtype)
            torch.bmm(v, u.transpose(1, 2), out=products)
            kernels.output_transform(products.data_ptr(),
                                     None if bias is None else bias.data_ptr() + low * x.element_size(),
                                     y.data_ptr() + low * x.element_size(), batch, height, width, high - low,
                                     out_channels, rows, cols, first, count, threads)
    return y


def plain_3x3_layer(conv: torch.nn.Conv2d) -> bool:
    """A plain 3×3 convolution: stride 1, padding 1 (zeros), no dilation or groups."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def plain_3x3(conv: torch.nn.Conv2d, x: torch.Tensor) -> bool:
    """A `plain_3x3_layer` of a 4-D bf16 or fp32 CPU tensor without gradients, its weight of one of the dtype's
    WEIGHT_TYPES."""
    return (x.device.type == "cpu" and x.dtype in OUTPUT_TILES and conv.weight.dtype in WEIGHT_TYPES[x.dtype]
            and x.dim() == 4 and (conv.bias is None or conv.bias.dtype == x.dtype) and not torch.is_grad_enabled()
            and plain_3x3_layer(conv))


def _tiles(x: torch.Tensor) -> int:
    m = OUTPUT_TILES[x.dtype]
    return x.shape[0] * -(-x.shape[2] // m) * -(-x.shape[3] // m)


def winograd_applies(conv: torch.nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv(x)` takes the Winograd path: a plain 3×3 convolution of a bf16 or fp32 CPU tensor without
    gradients, channels in multiples of CHANNEL_BLOCK and at least MIN_CHANNELS in, enough tiles, and the dtype's
    transforms compiled and measured faster on this machine."""
    if not plain_3x3(conv, x) or conv.in_channels % CHANNEL_BLOCK or conv.out_channels % CHANNEL_BLOCK:
        return False
    return (conv.in_channels >= MIN_CHANNELS[x.dtype] and _tiles(x) >= MIN_TILES[x.dtype]
            and _kernels(x.dtype) is not None
            and winograd_pays(x.dtype))


def unfolded_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=1) for a 3×3 weight as one matrix product over x's unfolded 3×3
    neighbourhoods (im2col), channels-last output: for small images, where oneDNN's direct kernel is slow for some
    shapes (SD1.5's 2560 → 1280 at 8×8, CFG batch: 35.7 ms against 19.7)."""
    batch, channels, height, width = x.shape
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))          # (batch, height + 2, width + 2, channels)
    columns = padded.unfold(1, 3, 1).unfold(2, 3, 1).permute(0, 1, 2, 4, 5, 3).reshape(-1, 9 * channels)
    matrix = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)   # (out, 3, 3, in): the columns' order
    out = torch.mm(columns, matrix.t()) if bias is None else torch.addmm(bias, columns, matrix.t())
    return out.view(batch, height, width, -1).permute(0, 3, 1, 2)


def unfolded_applies(conv: torch.nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv(x)` takes `unfolded_conv2d`: a plain 3×3 convolution of a small bf16 CPU image (too few tiles
    for Winograd) with at least MIN_CHANNELS in, of a shape where it was measured faster than the direct convolution
    on this machine."""
    return (plain_3x3(conv, x) and x.dtype == conv.weight.dtype == torch.bfloat16
            and conv.in_channels >= MIN_CHANNELS[x.dtype]
            and _tiles(x) < MIN_TILES[x.dtype]
            and unfolded_pays(x.shape[0], conv.in_channels, conv.out_channels, x.shape[2], x.shape[3]))


@functools.cache
def unfolded_pays(batch: int, channels: int, out_channels: int, height: int, width: int) -> bool:
    """Whether `unfolded_conv2d` beats oneDNN's direct convolution on this machine for this shape (measured once per
    shape and machine: models/tuning.py)."""
    def ways():
        x, weight, bias = conv_inputs(batch, channels, out_channels, height, width)
        return lambda: unfolded_conv2d(x, weight, bias), lambda: F.conv2d(x, weight, bias, padding=1)

    return candidate_pays(f"unfolded-conv-{batch}x{channels}x{height}x{width}-{out_channels}", ways,
                          torch.bfloat16)


def conv_inputs(batch: int, channels: int, out_channels: int, height: int, width: int,
                dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A channels-last input, 3×3 weight and bias of one convolution shape in `dtype`, random, for timing."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, height, width, generator=generator).to(dtype)
    weight = (torch.randn(out_channels, channels, 3, 3, generator=generator) * 0.02).to(dtype)
    return (x.contiguous(memory_format=torch.channels_last), weight.contiguous(memory_format=torch.channels_last),
            torch.zeros(out_channels, dtype=dtype))


@functools.cache
def winograd_pays(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether Winograd in `dtype` beats oneDNN's direct convolution on this machine (models/tuning.py), timed on
    SD1.5's most frequent 3×3 convolution at 512²: 320 → 320 channels, 64², CFG batch (bf16: 1.41–1.47× faster on
    AVX512-BF16 without AMX; fp32 F(4×4): 2.3×, on AVX-512 or AVX2 alone)."""
    if _kernels(dtype) is None:
        return False

    def ways():
        x, weight, bias = conv_inputs(2, 320, 320, 64, 64, dtype)
        return lambda: winograd_conv2d(x, weight, bias), lambda: F.conv2d(x, weight, bias, padding=1)

    try:
        return candidate_pays(NAMES[dtype], ways, dtype)
    finally:
        release_kernel_buffers()


class WinogradConv2d(torch.nn.Conv2d):
    """Conv2d that runs by Winograd where `winograd_applies`, unfolded where `unfolded_applies`, else as torch's
    own (a 16-bit weight widened for an fp32 input: models/half_weights.py)."""

    @releasing_buffers
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if winograd_applies(self, x):
            return winograd_conv2d(x, self.weight, self.bias)
        if unfolded_applies(self, x):
            return unfolded_conv2d(x, self.weight, self.bias)
        return self._conv_forward(x, weight_for(self, x), self.bias)


def use_winograd_convolutions(model: torch.nn.Module) -> None:
    """Make every plain torch Conv2d of `model` a WinogradConv2d (same weights and state). The transforms' buffers
    are kept from one convolution to the next: models/native.release_kernel_buffers once the model's work is done."""
    for module in model.modules():
        if type(module) is torch.nn.Conv2d:
            module.__class__ = WinogradConv2d


def _linear_combination(coefficients: list[float], terms: list[str]) -> str:
    parts = []
    for c, term in zip(coefficients, terms):
        if c == 0:
            continue
        parts.append(f"+{term}" if c == 1 else f"-{term}" if c == -1 else f"+({c!r}f)*{term}")
    return "".join(parts) or "0.f"


def _sandwich(matrix: list[list[float]], source: str, columns: int, indent: str, store) -> list[str]:
    """C lines for matrix·source·matrixᵀ on CH lanes: the first product into e[i][j][k] (source has `columns`
    columns), then one line store(i, j, value expression) per element of the result."""
    rows, inner = len(matrix), len(matrix[0])
    lines = [f"{indent}for (int k = 0; k < CH; k++) e[{i}][{j}][k] = "
             f"{_linear_combination(matrix[i], [f'{source}[{l}][{j}][k]' for l in range(inner)])};"
             for i in range(rows) for j in range(columns)]
    return lines + [indent + store(i, j, _linear_combination(matrix[j], [f"e[{i}][{l}][k]" for l in range(columns)]))
                    for i in range(rows) for j in range(rows)]


def transform_header(dtype: torch.dtype, m: int) -> str:
    """C preamble of the transforms of F(m×m, 3×3) on `dtype` elements: sizes, element type, loads and store."""
    return SCALAR_LOADS + f"""#define N {m + 2}
#define M {m}
#define CH {CHANNEL_BLOCK}
typedef {C_TYPES[dtype]} elem;
#define load load_{SUFFIXES[dtype]}
""" + ("""static inline uint16_t store(float f) { bits v; v.f = bf16_rounded(f); return (uint16_t)(v.u >> 16); }
""" if dtype == torch.bfloat16 else """static inline float store(float f) { return f; }
""")


def input_transform_source(m: int, name: str, parameters: str, store, clauses: str = "", before: str = "",
                           after: str = "", tile_before: str = "", tile_after: str = "") -> str:
    """C source of a function `name`(x, `parameters`, batch, h, w, c, pad, rows, cols, first, count, threads) that
    runs the input transform d → Bᵀ·d·B of F(m×m, 3×3) over the tiles [first, first + count) of the rows×cols grids
    of the NHWC images x (`pad` zero rows above the image: 1, or 0 where x holds the rows around the output) and
    hands each value to store(i, j, value expression) (a C statement; t, c0 and k name the tile, channel block and
    lane); `clauses` extend the loop's OpenMP pragma, `before` and `after` are C lines around the loop,
    `tile_before` and `tile_after` around each tile's loop over its channels."""
    _, _, b_t = winograd_matrices(m, INTERPOLATION_POINTS[m])
    n = m + 2
    lines = [f"""void {name}(const elem *x, {parameters}, int batch, int h, int w, int c, int pad, int rows, int cols,
    long first, long count, int threads) {{{before}
#pragma omp parallel for num_threads(threads) schedule(static){clauses}
  for (long t = first; t < first + count; t++) {{
    int b = t / ((long)rows * cols), r = (t / cols) % rows, q = t % cols;{tile_before}
    for (int c0 = 0; c0 < c; c0 += CH) {{
      float d[N][N][CH], e[N][N][CH];
      for (int i = 0; i < N; i++) for (int j = 0; j < N; j++) {{
        int y = r * M - pad + i, z = q * M - 1 + j;
        const elem *s = x + (((long)b * h + y) * w + z) * c + c0;
        int inside = y >= 0 && y < h && z >= 0 && z < w;
        for (int k = 0; k < CH; k++) d[i][j][k] = inside ? load(s[k]) : 0.f;
      }}"""]
    lines += _sandwich(b_t.tolist(), "d", n, "      ", store)
    lines.append(f"""    }}{tile_after}
  }}{after}
}}
""")
    return "\n".join(lines)


def output_transform_source(m: int, product_type: str = "elem", scaled: bool = False) -> str:
    """C source of `output_transform`: the products p[N*N][count][c] (`product_type` elements; `scaled`: int32 sums
    times scale[N*N][c] · tile_scale[N*N][count], one factor per position and channel and one per position and tile)
    of the tiles [first, first + count) → c channels of the NHWC output y (`stride` channels), + bias."""
    a_t, _, _ = winograd_matrices(m, INTERPOLATION_POINTS[m])
    n = m + 2
    scale, read = ((", const float *scale, const float *tile_scale",
                    "(float)s[k] * scale[i * c + c0 + k] * tile_scale[i * count + t - first]") if scaled
                   else ("", "load(s[k])"))
    lines = [f"""void output_transform(const {product_type} *p{scale}, const elem *bias, elem *y, int batch, int h,
                      int w, int c, int stride, int rows, int cols, long first, long count, int threads) {{
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long t = first; t < first + count; t++) {{
    int b = t / ((long)rows * cols), r = (t / cols) % rows, q = t % cols;
    for (int c0 = 0; c0 < c; c0 += CH) {{
      float d[N][N][CH], e[M][N][CH], beta[CH];
      for (int k = 0; k < CH; k++) beta[k] = bias ? load(bias[c0 + k]) : 0.f;
      for (int i = 0; i < N * N; i++) {{
        const {product_type} *s = p + (i * count + t - first) * c + c0;
        for (int k = 0; k < CH; k++) d[i / N][i % N][k] = {read};
      }}"""]
    lines += _sandwich(a_t.tolist(), "d", n, "      ", lambda i, j, value: (
        f"if (r * M + {i} < h && q * M + {j} < w) {{"
        f" elem *o = y + (((long)b * h + r * M + {i}) * w + q * M + {j}) * stride + c0;"
        f" for (int k = 0; k < CH; k++) o[k] = store(beta[k] {value}); }}"))
    lines.append("""    }
  }
}""")
    return "\n".join(lines)


def weight_transform_source(m: int, weight_dtype: torch.dtype, out_type: str = "elem", store: str = "store") -> str:
    """C source of `weight_transform_<suffix>`: a channels-last 3×3 weight of `weight_dtype` → u[N*N][co][ci] of
    `out_type` elements (each value through `store`), G·g·Gᵀ of F(m×m, 3×3)."""
    _, g, _ = winograd_matrices(m, INTERPOLATION_POINTS[m])
    n, suffix = m + 2, SUFFIXES[weight_dtype]
    lines = [f"""/* w: [co][3][3][ci] {suffix} (channels-last weight) → u[N*N][co][ci] */
void weight_transform_{suffix}(const {C_TYPES[weight_dtype]} *w, {out_type} *u, int co, int ci, int threads) {{
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long o = 0; o < co; o++) for (int c0 = 0; c0 < ci; c0 += CH) {{
    float g[3][3][CH], e[N][3][CH];
    for (int i = 0; i < 3; i++) for (int j = 0; j < 3; j++) {{
      const {C_TYPES[weight_dtype]} *s = w + ((o * 3 + i) * 3 + j) * ci + c0;
      for (int k = 0; k < CH; k++) g[i][j][k] = load_{suffix}(s[k]);
    }}"""]
    lines += _sandwich(g.tolist(), "g", 3, "    ", lambda i, j, value: (
        f"{{ {out_type} *dst = u + ({i * n + j} * (long)co + o) * ci + c0;"
        f" for (int k = 0; k < CH; k++) dst[k] = {store}({value}); }}"))
    lines.append("""  }
}
""")
    return "\n".join(lines)


def kernel_source(dtype: torch.dtype) -> str:
    """C source of the three transforms of `dtype`'s F(m, 3) (OUTPUT_TILES), with the matrices written into the
    expressions."""
    m = OUTPUT_TILES[dtype]
    n = m + 2
    store = lambda i, j, value: (f"{{ elem *o = v + ({i * n + j} * count + t - first) * c + c0;"
                                 f" for (int k = 0; k < CH; k++) o[k] = store({value}); }}")
    return "\n".join([transform_header(dtype, m), input_transform_source(m, "input_transform", "elem *v", store),
                      *(weight_transform_source(m, weight_dtype) for weight_dtype in WEIGHT_TYPES[dtype]),
                      output_transform_source(m)])


@functools.cache
def _kernels(dtype: torch.dtype = torch.bfloat16) -> ctypes.CDLL | None:
    """The compiled transforms of `dtype` (built once per source and machine); None, logged once, where they cannot
    be."""
    kernels = compiled_library(NAMES[dtype], kernel_source(dtype))
    if kernels is None:
        return None
    pointer, size, index = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    kernels.input_transform.argtypes = [pointer, pointer, *[size] * 7, index, index, size]
    for weight_dtype in WEIGHT_TYPES[dtype]:
        getattr(kernels, f"weight_transform_{SUFFIXES[weight_dtype]}").argtypes = [pointer, pointer, size, size, size]
    kernels.output_transform.argtypes = [pointer, pointer, pointer, *[size] * 7, index, index, size]
    return kernels
