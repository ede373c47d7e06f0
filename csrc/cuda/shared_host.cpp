// The host code the CUDA kernels' module (wavg_ext._C_cuda) shares with wavg_ext._C:
// argument checks and plans. Compiled into _C_cuda too, so that it loads on its own; the
// two modules are loaded with local symbol scope, so each runs its own copy.
#include "../basis_args.cpp"
#include "../pair_args.cpp"
#include "../tensor_checks.cpp"
