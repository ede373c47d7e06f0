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

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <climits>
#include <cstdint>
#include <vector>

namespace wavg_ext::cuda {

constexpr int kBlockSize = 512;
constexpr int64_t kChunkSize = 65536;
constexpr int kMaxBlocks = 320;

// Tensors per launch for a given number of lists, chosen so that the metadata
// stays below the 4 KiB kernel-parameter limit of older toolkits.
template <int depth>
struct MaxTensors;
template <>
struct MaxTensors<1> {
  static constexpr int value = 110;
};
template <>
struct MaxTensors<2> {
  static constexpr int value = 64;
};
template <>
struct MaxTensors<3> {
  static constexpr int value = 48;
};

template <int depth>
struct TensorListMetadata {
  static constexpr int kMaxTensors = MaxTensors<depth>::value;
  void* addresses[depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  unsigned char block_to_tensor[kMaxBlocks];
  int block_to_chunk[kMaxBlocks];
};
static_assert(sizeof(TensorListMetadata<1>) <= 4000 && sizeof(TensorListMetadata<2>) <= 4000 &&
                  sizeof(TensorListMetadata<3>) <= 4000,
              "metadata must fit the kernel parameter space with room for the functor");
static_assert(MaxTensors<1>::value <= 255, "block_to_tensor is one byte");

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
  Meta meta;
  int tensors = 0;
  int blocks = 0;
  auto launch = [&] {
    multi_tensor_kernel<depth><<<blocks, kBlockSize, 0, stream>>>(meta, work_base, functor, args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
      meta.block_to_tensor[blocks] = static_cast<unsigned char>(tensors - 1);
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
