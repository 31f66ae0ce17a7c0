/* The float64 work of vild_d2.teacher.region_crops.crop_regions_batch on a CPU, compiled: the
 * cumulative tables, and per crop in one pass the bilinear samples of its table on its lattice, the
 * differences of cumulative sums along the box-filtered axes, the bin-area scale and the write into
 * the output in its layout.
 *
 * It repeats the torch path's arithmetic operation for operation, so that both give the same bits:
 *   - cumulative sums added in order from 0, as torch.cumsum does;
 *   - every crop's sample coordinates and scale from its box, operation for operation;
 *   - samples as ATen's CPU grid_sample computes them in float64 (bilinear, padding "border",
 *     align_corners=False): the location (g + 1) * (size / 2) - 0.5 clamped to [0, size - 1],
 *     corner weights as products of the distances to the opposite sides, corners past the last row
 *     or column read as 0, and the four terms added in the order nw, ne, sw, se;
 *   - differences in float64, the result rounded to float32, then multiplied by the float32 scale.
 * ATen's vectorised kernel may be built with its multiplies and adds contracted into fused
 * multiply-adds, which round once instead of twice; so the samples come in two variants, plain and
 * fused, and the caller picks the one that reproduces torch on this machine. The file itself is
 * built without contraction (-ffp-contract=off).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* dst [outer, length + 1, inner] = cumulative sums of src [outer, length, inner] along the middle
 * axis, preceded by a zero (both contiguous). */
void vild_cumulative(const double *src, double *dst, int64_t outer, int64_t length,
                     int64_t inner) {
    for (int64_t o = 0; o < outer; ++o) {
        const double *s = src + o * length * inner;
        double *d = dst + o * (length + 1) * inner;
        if (inner == 1) {
            double acc = 0.0;
            d[0] = 0.0;
            for (int64_t k = 0; k < length; ++k) {
                acc += s[k];
                d[k + 1] = acc;
            }
            continue;
        }
        for (int64_t i = 0; i < inner; ++i) d[i] = 0.0;
        for (int64_t k = 0; k < length; ++k) {
            const double *row = s + k * inner;
            double *prev = d + k * inner;
            double *next = prev + inner;
            /* the first row is 0 + x, which is x exactly, as torch's running sum from 0 gives */
            for (int64_t i = 0; i < inner; ++i) next[i] = prev[i] + row[i];
        }
    }
}

/* dst [C, h, w] (contiguous) = the uint8 image src [C, h, w] (strides src_sc, src_sh, src_sw)
 * normalised as region_crops.normalize_for_clip does in float32: (x / 255 - mean[c]) / std[c]. */
void vild_normalize_u8(const uint8_t *src, int64_t channels, int64_t h, int64_t w, int64_t src_sc,
                       int64_t src_sh, int64_t src_sw, const float *mean, const float *std,
                       float *dst) {
    for (int64_t c = 0; c < channels; ++c) {
        const float m = mean[c], s = std[c];
        for (int64_t y = 0; y < h; ++y) {
            const uint8_t *row = src + c * src_sc + y * src_sh;
            float *out = dst + (c * h + y) * w;
            for (int64_t x = 0; x < w; ++x) out[x] = ((float)row[x * src_sw] / 255.0f - m) / s;
        }
    }
}

/* dst [C, dst_h, dst_w] (strides dst_sc, dst_sh, 1) = the float32 image src [C, h, w] (strides
 * src_sc, src_sh, src_sw) in float64, its edge rows and columns repeated outwards: one row and
 * column before it, and after it up to dst_h and dst_w (F.pad's "replicate"). */
void vild_pad_replicate(const float *src, int64_t channels, int64_t h, int64_t w, int64_t src_sc,
                        int64_t src_sh, int64_t src_sw, double *dst, int64_t dst_h, int64_t dst_w,
                        int64_t dst_sc, int64_t dst_sh) {
    for (int64_t c = 0; c < channels; ++c) {
        for (int64_t r = 0; r < dst_h; ++r) {
            const int64_t sr = r < 1 ? 0 : (r - 1 < h ? r - 1 : h - 1);
            const float *row = src + c * src_sc + sr * src_sh;
            double *out = dst + c * dst_sc + r * dst_sh;
            out[0] = (double)row[0];
            for (int64_t x = 1; x <= w; ++x) out[x] = (double)row[(x - 1) * src_sw];
            for (int64_t x = w + 1; x < dst_w; ++x) out[x] = (double)row[(w - 1) * src_sw];
        }
    }
}

/* One axis of a crop: for each of `count` normalised coordinates, the index of the low neighbour,
 * the distances to it (`frac`) and to the high one (`rest`), and whether the high one is inside
 * the table (`inside`); returns how many leading points have it inside (all but the last few when
 * the coordinates grow along the axis, as they do for a box with lo <= hi). */
static inline int64_t locate(const double *grid, int64_t count, int64_t size, int fused,
                             int64_t *low, double *frac, double *rest, unsigned char *inside) {
    const double scaling = (double)size / 2;
    const double max_val = (double)(size - 1);
    int64_t prefix = 0;
    for (int64_t k = 0; k < count; ++k) {
        double x = fused ? fma(grid[k] + 1.0, scaling, -0.5) : (grid[k] + 1.0) * scaling - 0.5;
        x = x > 0.0 ? x : 0.0;
        x = x < max_val ? x : max_val;
        const double fl = floor(x);
        low[k] = (int64_t)fl;
        frac[k] = x - fl;
        rest[k] = 1.0 - frac[k];
        inside[k] = low[k] + 1 < size;
        prefix += (prefix == k) & inside[k];
    }
    return prefix;
}

static inline double blend(double nw_val, double ne_val, double sw_val, double se_val, double nw,
                           double ne, double sw, double se, int fused) {
    if (fused) {
        double r = nw_val * nw;
        r = fma(ne_val, ne, r);
        r = fma(sw_val, sw, r);
        return fma(se_val, se, r);
    }
    return nw_val * nw + ne_val * ne + sw_val * sw + se_val * se;
}

/* Samples of one channel on the lattice rows [gy] x columns [gx] of `table` (rows row_stride
 * apart), into dst [gy, gx]. Rows before y_prefix and columns before x_prefix have their high
 * neighbours inside the table; the others are checked point by point. */
static inline void sample_channel(const double *table, int64_t row_stride, const int64_t *y_low,
                                  const double *y_frac, const double *y_rest,
                                  const unsigned char *y_in, int64_t gy, int64_t y_prefix,
                                  const int64_t *x_low, const double *x_frac, const double *x_rest,
                                  const unsigned char *x_in, int64_t gx, int64_t x_prefix,
                                  int fused, double *dst) {
    for (int64_t i = 0; i < gy; ++i) {
        const double *north = table + y_low[i] * row_stride;
        const double *south = north + row_stride;
        const double n = y_frac[i], s = y_rest[i];
        double *row = dst + i * gx;
        if (i < y_prefix) {
            for (int64_t j = 0; j < x_prefix; ++j) {
                const int64_t xw = x_low[j];
                const double w = x_frac[j], e = x_rest[j];
                row[j] = blend(north[xw], north[xw + 1], south[xw], south[xw + 1], s * e, s * w,
                               n * e, n * w, fused);
            }
            for (int64_t j = x_prefix; j < gx; ++j) {
                const int64_t xw = x_low[j];
                const double w = x_frac[j], e = x_rest[j];
                const double ne_val = x_in[j] ? north[xw + 1] : 0.0;
                const double se_val = x_in[j] ? south[xw + 1] : 0.0;
                row[j] = blend(north[xw], ne_val, south[xw], se_val, s * e, s * w, n * e, n * w,
                               fused);
            }
        } else {
            const int south_in = y_in[i];
            for (int64_t j = 0; j < gx; ++j) {
                const int64_t xw = x_low[j];
                const double w = x_frac[j], e = x_rest[j];
                const double ne_val = x_in[j] ? north[xw + 1] : 0.0;
                const double sw_val = south_in ? south[xw] : 0.0;
                const double se_val = (south_in && x_in[j]) ? south[xw + 1] : 0.0;
                row[j] = blend(north[xw], ne_val, sw_val, se_val, s * e, s * w, n * e, n * w,
                               fused);
            }
        }
    }
}

/* Crop values from samples v [gy, gx] of one channel into o (element j at o[j * step]). */
static inline void finish_channel(const double *v, int64_t gx, int64_t size, int area_x,
                                  int area_y, float f, float *o, int64_t row_step, int64_t step) {
    for (int64_t i = 0; i < size; ++i) {
        const double *r0 = v + i * gx, *r1 = r0 + gx;
        float *dst = o + i * row_step;
        if (area_x && area_y) {
            for (int64_t j = 0; j < size; ++j)
                dst[j * step] = (float)((r1[j + 1] - r1[j]) - (r0[j + 1] - r0[j])) * f;
        } else if (area_x) {
            for (int64_t j = 0; j < size; ++j) dst[j * step] = (float)(r0[j + 1] - r0[j]) * f;
        } else if (area_y) {
            for (int64_t j = 0; j < size; ++j) dst[j * step] = (float)(r1[j] - r0[j]) * f;
        } else {
            for (int64_t j = 0; j < size; ++j) dst[j * step] = (float)r0[j];
        }
    }
}

/* The normalised coordinates of one axis of a crop, computed as region_crops computes them with
 * torch operations: the box [lo, lo + side] into `size` bins of side / size, the bin edges (area)
 * or bin centres - 0.5 (bilinear); + 1 for the border; + `offset` (the image's first column in the
 * atlas; 0 along y); to grid_sample's units over the table's `extent`. */
static inline void axis_grid(double lo, double side, int64_t size, int area, int64_t offset,
                             int64_t extent, double *grid) {
    const double step = side / (double)size;
    const int64_t count = size + area;
    for (int64_t k = 0; k < count; ++k) {
        const double at = area ? (double)k : (double)k + 0.5;
        double v = lo + at * step;
        v = v - (area ? 0.0 : 0.5);
        v = v + 1.0;
        v = v + (double)offset;
        grid[k] = (2.0 * v + 1.0) / (double)extent - 1.0;
    }
}

static int cut_range(const double *const tables[4], const int64_t height[4], const int64_t width[4],
                     const int64_t row_stride[4], const int64_t chan_stride[4], int64_t channels,
                     const double *boxes, const int64_t *which, int64_t images,
                     const int64_t *case_, int64_t size, float *out, const int64_t out_strides[4],
                     int64_t first, int64_t last, int fused) {
    const int64_t points = size + 1;
    int64_t *low = malloc(2 * points * sizeof(int64_t));
    double *buf = malloc((6 * points + channels * points * points) * sizeof(double));
    unsigned char *in = malloc(2 * points);
    if (!low || !buf || !in) {
        free(low);
        free(buf);
        free(in);
        return -1;
    }
    unsigned char *x_in = in, *y_in = in + points;
    int64_t *x_low = low, *y_low = low + points;
    double *x_frac = buf, *x_rest = buf + points, *y_frac = buf + 2 * points;
    double *y_rest = buf + 3 * points, *grid_x = buf + 4 * points, *grid_y = buf + 5 * points;
    double *samples = buf + 6 * points; /* [C, gy, gx] */
    for (int64_t k = first; k < last; ++k) {
        const int c_ = (int)case_[k];
        const int area_x = c_ & 1, area_y = (c_ >> 1) & 1;
        const int64_t gx = size + area_x, gy = size + area_y;
        /* the box's sides, and the product of its bin sides along the box-filtered axes, whose
         * inverse scales the bin sums, as region_crops computes them */
        const double *box = boxes + 4 * k;
        const double side_x = box[2] - box[0], side_y = box[3] - box[1];
        const double bin_x = area_x ? side_x / (double)size : 1.0;
        const double bin_y = area_y ? side_y / (double)size : 1.0;
        const float f = (float)(1.0 / (bin_x * bin_y));
        axis_grid(box[0], side_x, size, area_x, which[k] * (width[c_] / images), width[c_],
                  grid_x);
        axis_grid(box[1], side_y, size, area_y, 0, height[c_], grid_y);
        const int64_t x_prefix =
            locate(grid_x, gx, width[c_], fused, x_low, x_frac, x_rest, x_in);
        const int64_t y_prefix =
            locate(grid_y, gy, height[c_], fused, y_low, y_frac, y_rest, y_in);
        for (int64_t c = 0; c < channels; ++c) {
            const double *table = tables[c_] + c * chan_stride[c_];
            double *v = samples + c * gy * gx;
            /* `fused` as a constant in each call, so that each variant's loop is compiled alone */
            if (fused)
                sample_channel(table, row_stride[c_], y_low, y_frac, y_rest, y_in, gy, y_prefix,
                               x_low, x_frac, x_rest, x_in, gx, x_prefix, 1, v);
            else
                sample_channel(table, row_stride[c_], y_low, y_frac, y_rest, y_in, gy, y_prefix,
                               x_low, x_frac, x_rest, x_in, gx, x_prefix, 0, v);
        }
        float *dst = out + k * out_strides[0];
        for (int64_t c = 0; c < channels; ++c)
            finish_channel(samples + c * gy * gx, gx, size, area_x, area_y, f,
                           dst + c * out_strides[1], out_strides[2], out_strides[3]);
    }
    free(low);
    free(buf);
    free(in);
    return 0;
}

/* Crops of a batch of N. Per crop k:
 *   boxes[k]: float64 x0, y0, x1, y1 in pixels of image which[k] (of `images` in the atlas);
 *   case_[k]: bit 0 box filter along x, bit 1 along y; tables[case] is that case's float64 atlas
 *     table [C, height, width] (rows row_stride apart, channels chan_stride apart; `images`
 *     images side by side, width / images columns each);
 * written to out + k * out_strides[0] + c * out_strides[1] + i * out_strides[2] + j * ...[3],
 * over `threads` OpenMP threads. `fused` picks the samples' variant. Returns 0, or -1 when scratch
 * memory could not be had. */
int vild_cut_crops(const double *const tables[4], const int64_t height[4], const int64_t width[4],
                   const int64_t row_stride[4], const int64_t chan_stride[4], int64_t channels,
                   const double *boxes, const int64_t *which, int64_t images,
                   const int64_t *case_, int64_t size, float *out, const int64_t out_strides[4],
                   int64_t n, int64_t threads, int fused) {
    int failed = 0;
    if (threads < 1) threads = 1;
    if (threads > n) threads = n > 0 ? n : 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads((int)threads) schedule(static) reduction(| : failed)
#endif
    for (int64_t part = 0; part < threads; ++part) {
        failed |= cut_range(tables, height, width, row_stride, chan_stride, channels, boxes, which,
                            images, case_, size, out, out_strides, n * part / threads,
                            n * (part + 1) / threads, fused) != 0;
    }
    return failed ? -1 : 0;
}

/* Samples of one channel [h, w] (rows row_stride apart) on the lattice gy x gx of normalised
 * coordinates, into dst [ngy, ngx]: what the caller compares with torch's grid_sample to pick the
 * variant. */
void vild_sample_lattice(const double *table, int64_t h, int64_t w, int64_t row_stride,
                         const double *gx, int64_t ngx, const double *gy, int64_t ngy, int fused,
                         double *dst) {
    int64_t *low = malloc((ngx + ngy) * sizeof(int64_t));
    double *buf = malloc(2 * (ngx + ngy) * sizeof(double));
    unsigned char *in = malloc(ngx + ngy);
    if (low && buf && in) {
        double *x_frac = buf, *x_rest = buf + ngx, *y_frac = buf + 2 * ngx;
        double *y_rest = buf + 2 * ngx + ngy;
        const int64_t x_prefix = locate(gx, ngx, w, fused, low, x_frac, x_rest, in);
        const int64_t y_prefix =
            locate(gy, ngy, h, fused, low + ngx, y_frac, y_rest, in + ngx);
        sample_channel(table, row_stride, low + ngx, y_frac, y_rest, in + ngx, ngy, y_prefix, low,
                       x_frac, x_rest, in, ngx, x_prefix, fused, dst);
    }
    free(low);
    free(buf);
    free(in);
}
