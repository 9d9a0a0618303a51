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
 * Build: cc -shared -fPIC -o libfake.so fake_delegate.c
 *        cc -shared -fPIC -DFAIL_CREATE -o libfail.so fake_delegate.c
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { kTfLiteOk = 0, kTfLiteError = 1 } TfLiteStatus;
typedef struct TfLiteTensor TfLiteTensor;
typedef struct TfLiteNode TfLiteNode;
typedef int TfLiteBufferHandle;
struct TfLiteOpaqueDelegateBuilder;
struct TfLiteDelegate;

typedef struct TfLiteIntArray {
    int size;
    int data[];
} TfLiteIntArray;

typedef struct TfLiteContext TfLiteContext;

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
typedef struct {
    char record[4096];
    char take[256];
    int prepared;
} FakeState;

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
        }
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
    free(delegate->data_);
    free(delegate);
}
