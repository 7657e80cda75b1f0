// Stands in for CUDA's <cuda_runtime.h> when csrc/cuda/*.cuh is compiled for the emulator.
#pragma once
#include "../emulator.h"
