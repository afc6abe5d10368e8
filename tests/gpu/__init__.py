# Makes tests/ (not tests/gpu/) the import root, so the GPU tests import the CPU test modules' helpers.
