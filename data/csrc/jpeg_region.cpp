/* Region-of-interest JPEG decoding with libjpeg-turbo (>= 1.5): internimage.data._jpeg.
 *
 * Plain C-style C++ (only POD types, so the longjmp out of libjpeg skips no destructor).
 *
 * A random-resized crop keeps on average about half of a photo. Decoding the whole image and then
 * cropping pays for the inverse DCT, upsampling and colour conversion of pixels that are thrown
 * away, and for the entropy decoding of every row below the crop. Here libjpeg-turbo is told the
 * region first: jpeg_crop_scanline limits the per-row work to the region's columns,
 * jpeg_skip_scanlines entropy-decodes the rows above it without reconstructing them, and decoding
 * stops after the region's last row.
 *
 * The decoded window reaches REGION_MARGIN pixels beyond the region on every side (where the image
 * has them), so no pixel of the region sits at a window edge, where chroma upsampling would see a
 * clamped neighbour instead of the real one: the region's pixels equal those of a full decode.
 *
 * Strict: a libjpeg warning (corrupt data, premature end) raises like an error, so the caller can
 * hand doubtful files to a more forgiving decoder. What the data causes (corrupt or unsupported
 * files) raises _jpeg.JPEGError; a malformed request (bad arguments) raises plain ValueError, so a
 * caller's bug is never mistaken for a bad file. The GIL is released while decoding.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <jpeglib.h>

/* jpeg_crop_scanline and jpeg_skip_scanlines arrived in 1.5, and several of their crash fixes only
 * in 2.0 and 2.1: older systems build no extension and decode whole images with simplejpeg. */
#if !defined(LIBJPEG_TURBO_VERSION_NUMBER) || LIBJPEG_TURBO_VERSION_NUMBER < 2001000
#error "internimage.data._jpeg needs libjpeg-turbo >= 2.1"
#endif

#define STRINGIFY_(x) #x
#define STRINGIFY(x) STRINGIFY_(x)

#define REGION_MARGIN 16 /* pixels; more than any chroma upsampling filter reaches */
#define CHANNELS 3

typedef struct {
    struct jpeg_error_mgr manager;
    jmp_buf escape;
    char message[JMSG_LENGTH_MAX];
} StrictErrors;

static void raise_error(j_common_ptr cinfo) {
    StrictErrors *errors = (StrictErrors *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, errors->message);
    longjmp(errors->escape, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) raise_error(cinfo); /* warnings are corrupt data: strict */
}

typedef struct {
    const unsigned char *data;
    size_t size;
    int reduction;              /* DCT scale 1/reduction: 1, 2, 4 or 8 */
    JDIMENSION left, top;       /* region, in pixels of the scaled image */
    JDIMENSION width, height;
    unsigned char *out;         /* height x width x 3, row-major */
} Region;

static JDIMENSION min_dim(JDIMENSION a, JDIMENSION b) { return a < b ? a : b; }

/* 0 on success; otherwise -1 with `message` filled. Touches no Python object. */
static int decode_region(const Region *region, char *message) {
    struct jpeg_decompress_struct cinfo;
    StrictErrors errors;
    JSAMPLE *volatile row = NULL;

    cinfo.err = jpeg_std_error(&errors.manager);
    errors.manager.error_exit = raise_error;
    errors.manager.emit_message = on_message;
    if (setjmp(errors.escape)) {
        strcpy(message, errors.message);
        free(row);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, region->data, (unsigned long)region->size);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space != JCS_GRAYSCALE && cinfo.jpeg_color_space != JCS_YCbCr &&
        cinfo.jpeg_color_space != JCS_RGB) {
        snprintf(message, JMSG_LENGTH_MAX, "colour space %d has no RGB conversion here",
                 (int)cinfo.jpeg_color_space);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)region->reduction;
    jpeg_start_decompress(&cinfo);
    if (cinfo.output_components != CHANNELS ||
        (unsigned long long)region->left + region->width > cinfo.output_width ||
        (unsigned long long)region->top + region->height > cinfo.output_height) {
        snprintf(message, JMSG_LENGTH_MAX,
                 "region %ux%u+%u+%u outside the %ux%u image decoded at 1/%d",
                 region->width, region->height, region->left, region->top, cinfo.output_width,
                 cinfo.output_height, region->reduction);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }

    JDIMENSION window_left = region->left > REGION_MARGIN ? region->left - REGION_MARGIN : 0;
    JDIMENSION window_right =
        min_dim(region->left + region->width + REGION_MARGIN, cinfo.output_width);
    JDIMENSION window_width = window_right - window_left;
    if (window_width < cinfo.output_width) {
        /* Widens the window to whole iMCU columns: window_left moves left, the width grows. */
        jpeg_crop_scanline(&cinfo, &window_left, &window_width);
    } else {
        window_left = 0;
    }
    JDIMENSION window_top = region->top > REGION_MARGIN ? region->top - REGION_MARGIN : 0;
    if (window_top > 0) jpeg_skip_scanlines(&cinfo, window_top);

    row = (JSAMPLE *)malloc((size_t)window_width * CHANNELS);
    if (row == NULL) {
        strcpy(message, "out of memory for one scanline");
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    const size_t row_bytes = (size_t)region->width * CHANNELS;
    const size_t column_offset = (size_t)(region->left - window_left) * CHANNELS;
    const JDIMENSION end = region->top + region->height;
    while (cinfo.output_scanline < end) {
        JDIMENSION y = cinfo.output_scanline;
        JSAMPROW rows[1] = {row};
        if (jpeg_read_scanlines(&cinfo, rows, 1) != 1) {
            strcpy(message, "decoder returned no scanline");
            free(row);
            jpeg_destroy_decompress(&cinfo);
            return -1;
        }
        if (y >= region->top)
            memcpy(region->out + (size_t)(y - region->top) * row_bytes, row + column_offset,
                   row_bytes);
    }
    free(row);
    row = NULL;
    jpeg_abort_decompress(&cinfo); /* the rows below the region are never decoded */
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

PyDoc_STRVAR(decode_region_doc,
"decode_region(data, reduction, left, top, width, height, out) -> None\n\n"
"Decode the region [left, left+width) x [top, top+height) of the JPEG `data` at DCT scale\n"
"1/reduction (1, 2, 4 or 8) into `out`, a writable C-contiguous buffer of height*width*3 bytes\n"
"(uint8 RGB, rows first). Coordinates are pixels of the scaled image, whose size is\n"
"ceil(original / reduction). Raises JPEGError (a ValueError) for what the file causes: corrupt\n"
"data, libjpeg warnings included, an unsupported colour space, a region outside the decoded\n"
"image; plain ValueError for malformed arguments.");

static PyObject *JPEGError = NULL;

static PyObject *py_decode_region(PyObject *, PyObject *args) {
    Py_buffer data, out;
    int reduction;
    Py_ssize_t left, top, width, height;
    if (!PyArg_ParseTuple(args, "y*innnnw*", &data, &reduction, &left, &top, &width, &height,
                          &out))
        return NULL;
    PyObject *result = NULL;
    char message[JMSG_LENGTH_MAX];
    const Py_ssize_t limit = JPEG_MAX_DIMENSION;
    if (reduction != 1 && reduction != 2 && reduction != 4 && reduction != 8) {
        PyErr_Format(PyExc_ValueError, "reduction must be 1, 2, 4 or 8, got %d", reduction);
    } else if (left < 0 || top < 0 || width <= 0 || height <= 0 || left > limit || top > limit ||
               width > limit || height > limit) {
        PyErr_Format(PyExc_ValueError,
                     "region %zdx%zd+%zd+%zd: need left, top >= 0 and width, height >= 1, "
                     "all at most %zd", width, height, left, top, limit);
    } else if (!PyBuffer_IsContiguous(&out, 'C') || out.len != width * height * CHANNELS) {
        PyErr_Format(PyExc_ValueError, "out must be C-contiguous with %zd bytes, has %zd",
                     width * height * CHANNELS, out.len);
    } else {
        Region region = {static_cast<const unsigned char *>(data.buf), (size_t)data.len,
                         reduction, (JDIMENSION)left, (JDIMENSION)top, (JDIMENSION)width,
                         (JDIMENSION)height, static_cast<unsigned char *>(out.buf)};
        int status;
        Py_BEGIN_ALLOW_THREADS
        status = decode_region(&region, message);
        Py_END_ALLOW_THREADS
        if (status == 0) {
            result = Py_None;
            Py_INCREF(result);
        } else {
            PyErr_SetString(JPEGError, message);
        }
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"decode_region", py_decode_region, METH_VARARGS, decode_region_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_jpeg",
    "Region-of-interest JPEG decoding with libjpeg-turbo (see data/csrc/jpeg_region.cpp).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__jpeg(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    JPEGError = PyErr_NewExceptionWithDoc(
        "internimage.data._jpeg.JPEGError",
        "The JPEG could not be decoded here: corrupt, truncated, or an unsupported kind.",
        PyExc_ValueError, NULL);
    if (JPEGError == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(JPEGError); /* one reference for the global above, one given to the module */
    if (PyModule_AddObject(m, "JPEGError", JPEGError) < 0) {
        Py_DECREF(JPEGError);
        Py_CLEAR(JPEGError);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddStringConstant(m, "LIBJPEG_TURBO_VERSION",
                                   STRINGIFY(LIBJPEG_TURBO_VERSION)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
