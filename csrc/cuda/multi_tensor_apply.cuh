// Multi-tensor apply: one kernel launch covers many tensors. The host walks the
// tensors, cuts each into chunks of kChunkSize elements, and packs (tensor
// addresses, sizes, block -> (tensor, chunk)) into a metadata struct passed by
// value as a kernel parameter; when it is full (tensors or blocks), it launches
// and starts over, carrying a partly covered tensor into the next launch; a
// final flush launches the rest. Empty tensors are skipped. Sizes are int64.
//
// Written for wavg_ext after the pattern of PyTorch's MultiTensorApply.cuh; it
// includes only light headers so it compiles against torch's CPU wheel too.
#pragma once

#include <c10/util/Exception.h>

#include <climits>
#include <cstdint>
#include <vector>

#include "platform.cuh"

namespace wavg_ext::cuda {

constexpr int kBlockSize = 512;
constexpr int64_t kChunkSize = 65536;
constexpr int kMaxBlocks = 320;
// Parameter bytes left for work_base, the functor and its arguments.
constexpr int kParamReserve = 512;

// Tensors one launch carries for a given number of lists: as many as the metadata
// fits in this build's kernel-parameter space (kParamBytes: 4 KiB, or 32764 bytes on
// CUDA >= 12.1), and no more than blocks, since each tensor takes at least one.
template <int depth>
constexpr int max_tensors() {
  constexpr int per_block = sizeof(uint16_t) + sizeof(int);
  constexpr int per_tensor = depth * sizeof(void*) + sizeof(int64_t);
  constexpr int fit = (kParamBytes - kParamReserve - kMaxBlocks * per_block) / per_tensor;
  return fit < kMaxBlocks ? fit : kMaxBlocks;
}

template <int depth>
struct TensorListMetadata {
  static constexpr int kMaxTensors = max_tensors<depth>();
  void* addresses[depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  uint16_t block_to_tensor[kMaxBlocks];
  int block_to_chunk[kMaxBlocks];
};
static_assert(kMaxBlocks <= UINT16_MAX + 1, "block_to_tensor is two bytes");

// What a functor is told about its block's chunk: elements [start, start + n) of a
// tensor of numel elements, and the chunk's index among all chunks of the call (in
// tensor order, counting from the launcher's work_base): a fixed slot for per-chunk
// partial results, whatever the launch boundaries.
struct Chunk {
  int64_t start;
  int64_t n;
  int64_t numel;
  int64_t work;
};

// One tensor as the launcher sees it: an address per list and a shared length.
template <int depth>
struct TensorEntry {
  void* ptrs[depth];
  int64_t numel;
};

template <int depth, typename Functor, typename... Args>
__global__ void __launch_bounds__(kBlockSize)
    multi_tensor_kernel(TensorListMetadata<depth> meta, int64_t work_base, Functor functor,
                        Args... args) {
  const int tensor = meta.block_to_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t numel = meta.numel[tensor];
  const int64_t remaining = numel - start;
  const Chunk chunk{start, remaining < kChunkSize ? remaining : kChunkSize, numel,
                    work_base + static_cast<int64_t>(blockIdx.x)};
  void* ptrs[depth];
#pragma unroll
  for (int d = 0; d < depth; ++d) ptrs[d] = meta.addresses[d][tensor];
  functor(ptrs, chunk, args...);
}

// Chunks of kChunkSize elements the launcher cuts `entries` into (empty tensors: none).
template <int depth>
int64_t count_chunks(const std::vector<TensorEntry<depth>>& entries) {
  int64_t chunks = 0;
  for (const TensorEntry<depth>& e : entries) chunks += (e.numel + kChunkSize - 1) / kChunkSize;
  return chunks;
}

// functor(void* ptrs[depth], const Chunk& chunk, args...) runs in every block: elements
// [chunk.start, chunk.start + chunk.n) of the tensor whose base addresses are ptrs.
// Chunk indices start at work_base (calls split into several groups keep them distinct).
template <int depth, typename Functor, typename... Args>
void multi_tensor_apply(const std::vector<TensorEntry<depth>>& entries, cudaStream_t stream,
                        int64_t work_base, Functor functor, Args... args) {
  using Meta = TensorListMetadata<depth>;
  static_assert(sizeof(Meta) + kParamReserve <= static_cast<size_t>(kParamBytes),
                "metadata must fit the kernel parameter space with room for the functor");
  Meta meta;
  int tensors = 0;
  int blocks = 0;
  auto launch = [&] {
    launch_kernel("multi_tensor_apply", multi_tensor_kernel<depth, Functor, Args...>,
                  dim3(static_cast<unsigned>(blocks)), dim3(kBlockSize), stream, meta, work_base,
                  functor, args...);
    work_base += blocks;
    blocks = 0;
  };
  for (const TensorEntry<depth>& e : entries) {
    if (e.numel == 0) continue;
    const int64_t chunks = (e.numel + kChunkSize - 1) / kChunkSize;
    TORCH_CHECK(chunks <= INT_MAX, "wavg_ext: tensor of ", e.numel, " elements is too large");
    for (int d = 0; d < depth; ++d) meta.addresses[d][tensors] = e.ptrs[d];
    meta.numel[tensors] = e.numel;
    ++tensors;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[blocks] = static_cast<uint16_t>(tensors - 1);
      meta.block_to_chunk[blocks] = static_cast<int>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == kMaxBlocks || (last_chunk && tensors == Meta::kMaxTensors)) {
        launch();
        if (last_chunk) {
          tensors = 0;
        } else {
          // The current tensor goes on in the next launch, as its entry 0.
          for (int d = 0; d < depth; ++d) meta.addresses[d][0] = meta.addresses[d][tensors - 1];
          meta.numel[0] = meta.numel[tensors - 1];
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) launch();  // final flush
}

}  // namespace wavg_ext::cuda
