// The CUDA emulation's controls, for the Python module (no emulation macros here).
#pragma once

#include <cstdint>
#include <string>

namespace wavg_ext::emu {

bool enabled();             // this thread routes ops on CPU tensors to the emulated kernels
bool set_enabled(bool on);  // returns the previous state
struct Stats {
  int64_t launches, blocks, threads;
};
Stats stats();  // emulated launches so far, all threads
// Runs the emulator's own test kernel `name` (selftest.cpp); returns what it observed.
std::string selftest(const std::string& name);

}  // namespace wavg_ext::emu
