// labeld's load-time graph shim: what tch does not expose (freezing, inference optimisation, converting the
// constants of a frozen graph). Every entry point catches all C++ exceptions and returns them as a malloc'ed
// string (free() it), because an exception unwinding into Rust is undefined behaviour.

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/passes/frozen_graph_optimizations.h>

using torch::jit::Block;
using torch::jit::Module;

namespace {

// Pass flags, the same values as `Passes` in optimize.rs.
constexpr int FREEZE = 1;
constexpr int OPTIMIZE_FOR_INFERENCE = 2;
constexpr int CHANNELS_LAST = 4;

char *error_text(const char *what) {
  std::string text = what ? what : "unknown C++ exception";
  char *copy = static_cast<char *>(std::malloc(text.size() + 1));
  if (copy) std::memcpy(copy, text.c_str(), text.size() + 1);
  return copy;
}

// Rewrites every floating tensor constant in `block` (and its nested if/loop blocks) with `convert`.
// A frozen graph keeps its weights here, where Module::to does not reach.
template <typename Convert>
void rewrite_constants(Block *block, Convert convert) {
  for (auto *node : block->nodes()) {
    for (auto *nested : node->blocks()) rewrite_constants(nested, convert);
    if (node->kind() != c10::prim::Constant || !node->hasAttribute(c10::attr::value) ||
        node->kindOf(c10::attr::value) != torch::jit::AttributeKind::t)
      continue;
    at::Tensor value = node->t(c10::attr::value);
    if (!value.is_floating_point()) continue;
    at::Tensor converted = convert(value);
    if (converted.is_same(value)) continue;
    node->t_(c10::attr::value, converted);
    node->output()->inferTypeFrom(converted);
  }
}

template <typename Convert>
void rewrite_all_constants(const Module &module, Convert convert) {
  for (auto *function : module._ivalue()->compilation_unit()->get_functions()) {
    if (function->isGraphFunction()) rewrite_constants(torch::jit::toGraphFunction(*function).graph()->block(), convert);
  }
}

Module optimized(const Module &original, int passes) {
  // optimize_for_inference rewrites an already-frozen module in place; the original must stay intact.
  Module module = original.clone();
  bool frozen = !module.hasattr("training");
  if (passes & OPTIMIZE_FOR_INFERENCE) {
    module = torch::jit::optimize_for_inference(module);
  } else if (passes & FREEZE) {
    if (frozen) {
      auto graph = module.get_method("forward").graph();
      torch::jit::OptimizeFrozenGraph(graph, true);
    } else {
      module = torch::jit::freeze(module);
    }
  }
  if (passes & CHANNELS_LAST) {
    auto graph = module.get_method("forward").graph();
    rewrite_constants(graph->block(), [](const at::Tensor &t) {
      return t.dim() == 4 ? t.contiguous(at::MemoryFormat::ChannelsLast) : t;
    });
  }
  return module;
}

}  // namespace

extern "C" {

// Converts parameters, buffers and the tensor constants of every graph to `dtype` (a c10::ScalarType).
// Returns null on success, else the error.
char *labeld_convert(void *module, int dtype) {
  try {
    auto &m = *static_cast<Module *>(module);
    auto kind = static_cast<c10::ScalarType>(dtype);
    m.to(kind);
    rewrite_all_constants(m, [kind](const at::Tensor &t) { return t.scalar_type() == kind ? t : t.to(kind); });
    return nullptr;
  } catch (const std::exception &e) {
    return error_text(e.what());
  } catch (...) {
    return error_text(nullptr);
  }
}

// Returns a new module (`new torch::jit::Module`, freed by tch with delete) with `passes` applied to a clone
// of `module`, or null with *error set.
void *labeld_optimize(const void *module, int passes, char **error) {
  *error = nullptr;
  try {
    return new Module(optimized(*static_cast<const Module *>(module), passes));
  } catch (const std::exception &e) {
    *error = error_text(e.what());
  } catch (...) {
    *error = error_text(nullptr);
  }
  return nullptr;
}

// Returns `new Module(module.clone())` (graphs copied, tensors shared), or null with *error set.
void *labeld_clone(const void *module, char **error) {
  *error = nullptr;
  try {
    return new Module(static_cast<const Module *>(module)->clone());
  } catch (const std::exception &e) {
    *error = error_text(e.what());
  } catch (...) {
    *error = error_text(nullptr);
  }
  return nullptr;
}

}  // extern "C"
