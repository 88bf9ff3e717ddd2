/* Load a SavedModel with TensorFlow's C API, as TensorFlow Serving's C++ loader does, and run it.
 *
 *   load_saved_model EXPORT_DIR META_GRAPH_OUT [FEED DTYPE VALUE]... [-o FETCH OUT_FILE]...
 *
 * Loads EXPORT_DIR with the tag "serve" (TF_LoadSessionFromSavedModel) and writes the serialized
 * MetaGraphDef to META_GRAPH_OUT (the caller reads its signatures). Then, when fetches are
 * given, runs the session once: each FEED ("node:index") gets a scalar of DTYPE "int32" or
 * "float32" holding VALUE, and each FETCH ("node:index") is written to OUT_FILE as
 * int64 rank, int64 dims[rank], int32 TF_DataType, then the tensor's raw bytes.
 * Exit code 0 on success; 1 with TensorFlow's message on stderr otherwise.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tensorflow/c/c_api.h"

#define MAX_IO 16

static int fail(const char *what, TF_Status *status) {
  fprintf(stderr, "%s: %s\n", what, status ? TF_Message(status) : "");
  return 1;
}

/* "node:index" -> TF_Output of `graph`; oper is NULL when the node does not exist. */
static TF_Output output_named(TF_Graph *graph, const char *name) {
  char node[512];
  int index = 0;
  const char *colon = strrchr(name, ':');
  size_t length = colon ? (size_t)(colon - name) : strlen(name);
  if (length >= sizeof(node)) length = sizeof(node) - 1;
  memcpy(node, name, length);
  node[length] = '\0';
  if (colon) index = atoi(colon + 1);
  TF_Output output = {TF_GraphOperationByName(graph, node), index};
  return output;
}

static TF_Tensor *scalar(const char *dtype, const char *value) {
  if (strcmp(dtype, "int32") == 0) {
    TF_Tensor *tensor = TF_AllocateTensor(TF_INT32, NULL, 0, sizeof(int32_t));
    *(int32_t *)TF_TensorData(tensor) = (int32_t)strtol(value, NULL, 10);
    return tensor;
  }
  if (strcmp(dtype, "float32") == 0) {
    TF_Tensor *tensor = TF_AllocateTensor(TF_FLOAT, NULL, 0, sizeof(float));
    *(float *)TF_TensorData(tensor) = strtof(value, NULL);
    return tensor;
  }
  return NULL;
}

static int write_tensor(const char *path, TF_Tensor *tensor) {
  FILE *file = fopen(path, "wb");
  if (!file) return 0;
  int64_t rank = TF_NumDims(tensor);
  int32_t dtype = (int32_t)TF_TensorType(tensor);
  fwrite(&rank, sizeof rank, 1, file);
  for (int i = 0; i < rank; ++i) {
    int64_t dim = TF_Dim(tensor, i);
    fwrite(&dim, sizeof dim, 1, file);
  }
  fwrite(&dtype, sizeof dtype, 1, file);
  fwrite(TF_TensorData(tensor), 1, TF_TensorByteSize(tensor), file);
  return fclose(file) == 0;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s EXPORT_DIR META_GRAPH_OUT [FEED DTYPE VALUE]... [-o FETCH OUT]...\n",
            argv[0]);
    return 2;
  }
  TF_Status *status = TF_NewStatus();
  TF_Graph *graph = TF_NewGraph();
  TF_SessionOptions *options = TF_NewSessionOptions();
  TF_Buffer *meta_graph = TF_NewBuffer();
  const char *tags[] = {"serve"};
  TF_Session *session =
      TF_LoadSessionFromSavedModel(options, NULL, argv[1], tags, 1, graph, meta_graph, status);
  if (TF_GetCode(status) != TF_OK) return fail("TF_LoadSessionFromSavedModel", status);

  FILE *file = fopen(argv[2], "wb");
  if (!file || fwrite(meta_graph->data, 1, meta_graph->length, file) != meta_graph->length ||
      fclose(file) != 0)
    return fail("writing the MetaGraphDef", NULL);

  TF_Output inputs[MAX_IO], outputs[MAX_IO];
  TF_Tensor *input_values[MAX_IO], *output_values[MAX_IO];
  const char *output_paths[MAX_IO];
  int num_inputs = 0, num_outputs = 0;
  for (int i = 3; i < argc;) {
    if (strcmp(argv[i], "-o") == 0 && i + 2 < argc && num_outputs < MAX_IO) {
      outputs[num_outputs] = output_named(graph, argv[i + 1]);
      if (!outputs[num_outputs].oper) return fail(argv[i + 1], NULL);
      output_paths[num_outputs++] = argv[i + 2];
      i += 3;
    } else if (i + 2 < argc && num_inputs < MAX_IO) {
      inputs[num_inputs] = output_named(graph, argv[i]);
      input_values[num_inputs] = scalar(argv[i + 1], argv[i + 2]);
      if (!inputs[num_inputs].oper || !input_values[num_inputs]) return fail(argv[i], NULL);
      ++num_inputs;
      i += 3;
    } else {
      return fail("bad arguments", NULL);
    }
  }
  if (num_outputs > 0) {
    TF_SessionRun(session, NULL, inputs, input_values, num_inputs, outputs, output_values,
                  num_outputs, NULL, 0, NULL, status);
    if (TF_GetCode(status) != TF_OK) return fail("TF_SessionRun", status);
    for (int i = 0; i < num_outputs; ++i) {
      if (!write_tensor(output_paths[i], output_values[i])) return fail(output_paths[i], NULL);
      TF_DeleteTensor(output_values[i]);
    }
  }
  for (int i = 0; i < num_inputs; ++i) TF_DeleteTensor(input_values[i]);

  TF_CloseSession(session, status);
  TF_DeleteSession(session, status);
  TF_DeleteBuffer(meta_graph);
  TF_DeleteSessionOptions(options);
  TF_DeleteGraph(graph);
  TF_DeleteStatus(status);
  printf("loaded %s\n", argv[1]);
  return 0;
}
