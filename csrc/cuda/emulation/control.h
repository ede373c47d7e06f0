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
// Seeds the order in which this thread's launches run a block's threads at each sweep
// (0, the default: forward, reverse, then shuffled; other seeds shuffle every sweep
// differently). Returns the previous seed.
uint64_t set_schedule_seed(uint64_t seed);
// Runs the emulator's own test kernel `name` (selftest.cpp); returns what it observed.
std::string selftest(const std::string& name);

}  // namespace wavg_ext::emu
