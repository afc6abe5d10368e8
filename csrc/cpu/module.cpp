// Python module stub: `import sami_kernels._C` loads this shared library, which
// runs the TORCH_LIBRARY registrations of the other translation units; the ops
// are then reachable as torch.ops.sami_kernels_C.<name>.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
