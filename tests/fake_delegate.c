/* A fake TFLite external delegate for tests (no TFLite headers needed).
 *
 * Implements the external delegate ABI of
 * tensorflow/lite/delegates/external/external_delegate_interface.h:
 *   tflite_plugin_create_delegate(keys, values, num_options, report_error)
 *   tflite_plugin_destroy_delegate(delegate)
 * Prepare takes no node, so the CPU runs the whole graph, unless the option
 * "take" lists node indices ("5,6,7"): those are replaced by one delegate
 * kernel that computes nothing (for partial-delegation counts, not answers).
 * The delegate records the options it got and that Prepare ran in the file
 * named by the option "record" (written at create and Prepare time only: the
 * edged worker installs its seccomp filter after load and warm-up, so nothing
 * is written at invoke).
 *
 * The option "control" names a file (at least 64 bytes) whose first word the
 * delegate reads while it runs, so a test can change its behaviour at run time
 * (the file is mapped at create time: reading it costs no system call, which
 * the worker's seccomp filter would refuse):
 *   ok         behave
 *   fail_load  create returns NULL (read at create time)
 *   crash      the next invoke traps (SIGILL)
 *   hang       the next invoke sleeps until the word changes
 *   wrong      invokes answer wrong outputs (every value reflected: v -> max - v)
 * With "control" given, Prepare takes the graph's last node when it is a
 * QUANTIZE (float or int8/uint8 in, int8/uint8 out: the bundled digits model
 * ends with one) and runs it in a kernel of its own, so that invoke passes
 * through the delegate. It reads tensors through the leading fields of
 * TfLiteTensor and its size in TF 2.4+/LiteRT (112 bytes on 64-bit), checked
 * against each tensor's byte count at Prepare.
 *
 * Build: cc -shared -fPIC -o libfake.so fake_delegate.c
 *        cc -shared -fPIC -DFAIL_CREATE -o libfail.so fake_delegate.c
 */
#include <fcntl.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

typedef enum { kTfLiteOk = 0, kTfLiteError = 1 } TfLiteStatus;
typedef struct TfLiteNode TfLiteNode;
typedef int TfLiteBufferHandle;
struct TfLiteOpaqueDelegateBuilder;
struct TfLiteDelegate;

typedef struct TfLiteIntArray {
    int size;
    int data[];
} TfLiteIntArray;

typedef struct TfLiteContext TfLiteContext;

/* The leading fields of TfLiteTensor (common.h, TF 2.4+ and LiteRT); TENSOR_SIZE is the whole struct's size. */
typedef struct TfLiteTensor {
    int type; /* TfLiteType: 1 float32, 3 uint8, 9 int8 */
    void *data;
    TfLiteIntArray *dims;
    float scale;
    int32_t zero_point;
    int allocation_type;
    size_t bytes;
} TfLiteTensor;
#define TENSOR_SIZE 112
#define TENSOR(ctx, i) ((TfLiteTensor *)((char *)(ctx)->tensors + (size_t)(i) * TENSOR_SIZE))
enum { kFloat32 = 1, kUInt8 = 3, kInt8 = 9, kBuiltinQuantize = 114 };

/* The leading fields of TfLiteNode (common.h). */
struct TfLiteNode {
    TfLiteIntArray *inputs;
    TfLiteIntArray *outputs;
};

/* TfLiteRegistration as of TF 2.16+/LiteRT (common.h). The runtime receives it
 * by value and reads only the fields it knows; the zeroed tail keeps a newer
 * runtime that appended fields from reading past our copy. */
typedef struct TfLiteRegistration {
    void *(*init)(TfLiteContext *context, const char *buffer, size_t length);
    void (*free)(TfLiteContext *context, void *buffer);
    TfLiteStatus (*prepare)(TfLiteContext *context, TfLiteNode *node);
    TfLiteStatus (*invoke)(TfLiteContext *context, TfLiteNode *node);
    const char *(*profiling_string)(const TfLiteContext *context, const TfLiteNode *node);
    int32_t builtin_code;
    const char *custom_name;
    int version;
    void *registration_external;
    void *(*async_kernel)(TfLiteContext *context, TfLiteNode *node);
    uint64_t inplace_operator;
    uint64_t reserved_tail[8];
} TfLiteRegistration;

/* The leading fields of TfLiteContext (common.h); only these are used. */
struct TfLiteContext {
    size_t tensors_size;
    TfLiteStatus (*GetExecutionPlan)(TfLiteContext *context, TfLiteIntArray **execution_plan);
    TfLiteTensor *tensors;
    void *impl_;
    TfLiteStatus (*ResizeTensor)(TfLiteContext *, TfLiteTensor *tensor, TfLiteIntArray *new_size);
    void (*ReportError)(TfLiteContext *, const char *msg, ...);
    TfLiteStatus (*AddTensors)(TfLiteContext *, int tensors_to_add, int *first_new_tensor_index);
    TfLiteStatus (*GetNodeAndRegistration)(TfLiteContext *, int node_index, TfLiteNode **node,
                                           TfLiteRegistration **registration);
    TfLiteStatus (*ReplaceNodeSubsetsWithDelegateKernels)(TfLiteContext *, TfLiteRegistration registration,
                                                          const TfLiteIntArray *nodes_to_replace,
                                                          struct TfLiteDelegate *delegate);
};

/* Layout of TfLiteDelegate in tensorflow/lite/core/c/common.h (TF 2.x, LiteRT):
 * fields are only ever appended, so this prefix is what every runtime reads. */
typedef struct TfLiteDelegate {
    void *data_;
    TfLiteStatus (*Prepare)(TfLiteContext *context, struct TfLiteDelegate *delegate);
    TfLiteStatus (*CopyFromBufferHandle)(TfLiteContext *context, struct TfLiteDelegate *delegate,
                                         TfLiteBufferHandle buffer_handle, TfLiteTensor *tensor);
    TfLiteStatus (*CopyToBufferHandle)(TfLiteContext *context, struct TfLiteDelegate *delegate,
                                       TfLiteBufferHandle buffer_handle, TfLiteTensor *tensor);
    void (*FreeBufferHandle)(TfLiteContext *context, struct TfLiteDelegate *delegate,
                             TfLiteBufferHandle *handle);
    int64_t flags;
    /* Non-NULL would make the runtime call the builder's Prepare instead of ours. */
    struct TfLiteOpaqueDelegateBuilder *opaque_delegate_builder;
} TfLiteDelegate;

#ifndef FAIL_CREATE
#define CONTROL_BYTES 64
typedef struct {
    char record[4096];
    char take[256];
    int prepared;
    const volatile char *control; /* the mapped control file, or NULL */
} FakeState;

static void record_line(const FakeState *st, const char *mode, const char *line);

static const volatile char *g_control; /* the kernel's view of it (one delegate per worker process) */

static int mode_is(const volatile char *control, const char *word) {
    if (!control)
        return 0;
    size_t n = strlen(word);
    for (size_t i = 0; i < n; i++)
        if (control[i] != word[i])
            return 0;
    char end = control[n];
    return end == 0 || end == ' ' || end == '\n' || end == '\t';
}

static const volatile char *map_control(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    void *p = mmap(NULL, CONTROL_BYTES, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    return p == MAP_FAILED ? NULL : (const volatile char *)p;
}

static size_t elements(const TfLiteIntArray *dims) {
    size_t n = 1;
    for (int i = 0; dims && i < dims->size; i++)
        n *= (size_t)dims->data[i];
    return n;
}

static size_t type_size(int type) {
    return type == kFloat32 ? 4 : (type == kUInt8 || type == kInt8) ? 1 : 0;
}

static int tensor_ok(const TfLiteTensor *t) {
    size_t sz = type_size(t->type);
    return sz && t->dims && t->bytes == sz * elements(t->dims);
}

/* QUANTIZE (requantize): out = clamp(round(real / s_out) + zp_out), real = in (float) or (in - zp_in) * s_in */
static TfLiteStatus quantize_invoke(TfLiteContext *context, TfLiteNode *node) {
    if (mode_is(g_control, "crash"))
        __builtin_trap();
    while (mode_is(g_control, "hang")) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    const TfLiteTensor *in = TENSOR(context, node->inputs->data[0]);
    TfLiteTensor *out = TENSOR(context, node->outputs->data[0]);
    size_t n = elements(out->dims);
    int lo = out->type == kInt8 ? -128 : 0, hi = out->type == kInt8 ? 127 : 255;
    int wrong = mode_is(g_control, "wrong");
    for (size_t i = 0; i < n; i++) {
        float real;
        if (in->type == kFloat32)
            real = ((const float *)in->data)[i];
        else if (in->type == kInt8)
            real = (float)(((const int8_t *)in->data)[i] - in->zero_point) * in->scale;
        else
            real = (float)(((const uint8_t *)in->data)[i] - in->zero_point) * in->scale;
        long q = lroundf(real / out->scale) + out->zero_point;
        q = q < lo ? lo : q > hi ? hi : q;
        if (wrong)
            q = hi - (q - lo);
        if (out->type == kInt8)
            ((int8_t *)out->data)[i] = (int8_t)q;
        else
            ((uint8_t *)out->data)[i] = (uint8_t)q;
    }
    return kTfLiteOk;
}

/* With a control file: take the last node when it is a QUANTIZE this kernel can run. */
static TfLiteStatus take_last_quantize(TfLiteContext *context, TfLiteDelegate *delegate, FakeState *st) {
    TfLiteIntArray *plan;
    if (context->GetExecutionPlan(context, &plan) != kTfLiteOk || plan->size < 1)
        return kTfLiteError;
    int last = plan->data[plan->size - 1];
    TfLiteNode *node;
    TfLiteRegistration *reg;
    if (context->GetNodeAndRegistration(context, last, &node, &reg) != kTfLiteOk)
        return kTfLiteError;
    if (reg->builtin_code != kBuiltinQuantize || node->inputs->size != 1 || node->outputs->size != 1) {
        record_line(st, "a", "control: the last node is not a QUANTIZE; nothing taken");
        return kTfLiteOk;
    }
    const TfLiteTensor *in = TENSOR(context, node->inputs->data[0]);
    const TfLiteTensor *out = TENSOR(context, node->outputs->data[0]);
    if (!tensor_ok(in) || !tensor_ok(out) || out->type == kFloat32 || out->scale <= 0) {
        record_line(st, "a", "control: tensor layout not as expected; nothing taken");
        return kTfLiteError;
    }
    TfLiteIntArray *nodes = calloc(1, sizeof *nodes + sizeof(int));
    if (!nodes)
        return kTfLiteError;
    nodes->size = 1;
    nodes->data[0] = last;
    TfLiteRegistration kreg;
    memset(&kreg, 0, sizeof kreg);
    kreg.invoke = quantize_invoke;
    kreg.custom_name = "fake_delegate_quantize";
    kreg.version = 1;
    g_control = st->control;
    TfLiteStatus status = context->ReplaceNodeSubsetsWithDelegateKernels(context, kreg, nodes, delegate);
    free(nodes);
    record_line(st, "a", "control: took the last QUANTIZE");
    return status;
}

static void record_line(const FakeState *st, const char *mode, const char *line) {
    if (!st->record[0])
        return;
    FILE *fh = fopen(st->record, mode);
    if (!fh)
        return;
    fputs(line, fh);
    fputc('\n', fh);
    fclose(fh);
}

static TfLiteStatus kernel_invoke(TfLiteContext *context, TfLiteNode *node) {
    (void)context;
    (void)node;
    return kTfLiteOk; /* computes nothing: outputs of taken nodes are left as they are */
}

static TfLiteStatus take_nodes(TfLiteContext *context, TfLiteDelegate *delegate, const char *list) {
    int n = 1;
    for (const char *p = list; *p; p++)
        n += *p == ',';
    TfLiteIntArray *nodes = calloc(1, sizeof *nodes + (size_t)n * sizeof(int));
    if (!nodes)
        return kTfLiteError;
    char *end;
    for (const char *p = list; *p; p = *end ? end + 1 : end) {
        long v = strtol(p, &end, 10);
        if (end == p)
            break;
        nodes->data[nodes->size++] = (int)v;
    }
    TfLiteRegistration reg;
    memset(&reg, 0, sizeof reg);
    reg.invoke = kernel_invoke;
    reg.custom_name = "fake_delegate";
    reg.version = 1;
    TfLiteStatus status = context->ReplaceNodeSubsetsWithDelegateKernels(context, reg, nodes, delegate);
    free(nodes);
    return status;
}

static TfLiteStatus fake_prepare(TfLiteContext *context, TfLiteDelegate *delegate) {
    FakeState *st = (FakeState *)delegate->data_;
    st->prepared += 1;
    record_line(st, "a", "prepare");
    if (st->take[0])
        return take_nodes(context, delegate, st->take);
    if (st->control)
        return take_last_quantize(context, delegate, st);
    return kTfLiteOk; /* no ReplaceNodeSubsetsWithDelegateKernels: every node stays on the CPU */
}
#endif

__attribute__((visibility("default"))) TfLiteDelegate *
tflite_plugin_create_delegate(char **options_keys, char **options_values, size_t num_options,
                              void (*report_error)(const char *)) {
#ifdef FAIL_CREATE
    (void)options_keys;
    (void)options_values;
    (void)num_options;
    if (report_error)
        report_error("fake delegate: no device answered");
    return NULL;
#else
    (void)report_error;
    FakeState *st = calloc(1, sizeof *st);
    TfLiteDelegate *d = calloc(1, sizeof *d);
    if (!st || !d) {
        free(st);
        free(d);
        return NULL;
    }
    for (size_t i = 0; i < num_options; i++) {
        if (strcmp(options_keys[i], "record") == 0) {
            strncpy(st->record, options_values[i], sizeof st->record - 1);
        } else if (strcmp(options_keys[i], "take") == 0) {
            strncpy(st->take, options_values[i], sizeof st->take - 1);
        } else if (strcmp(options_keys[i], "control") == 0) {
            st->control = map_control(options_values[i]);
        }
    }
    if (mode_is(st->control, "fail_load")) {
        if (report_error)
            report_error("fake delegate: the control file says fail_load");
        munmap((void *)st->control, CONTROL_BYTES);
        free(st);
        free(d);
        return NULL;
    }
    record_line(st, "w", "create");
    for (size_t i = 0; i < num_options; i++) {
        char line[8192];
        snprintf(line, sizeof line, "option %s=%s", options_keys[i], options_values[i]);
        record_line(st, "a", line);
    }
    d->data_ = st;
    d->Prepare = fake_prepare;
    d->flags = 0;
    d->opaque_delegate_builder = NULL;
    return d;
#endif
}

__attribute__((visibility("default"))) void tflite_plugin_destroy_delegate(TfLiteDelegate *delegate) {
    if (!delegate)
        return;
#ifndef FAIL_CREATE
    FakeState *st = (FakeState *)delegate->data_;
    if (st && st->control) {
        if (g_control == st->control)
            g_control = NULL;
        munmap((void *)st->control, CONTROL_BYTES);
    }
#endif
    free(delegate->data_);
    free(delegate);
}
