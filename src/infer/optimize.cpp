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

// The module's own graphs and its submodules' (not the whole compilation unit: clones share it).
template <typename Convert>
void rewrite_module_constants(const Module &module, Convert convert) {
  for (const auto &sub : module.modules()) {
    for (const auto &method : sub.get_methods()) rewrite_constants(method.graph()->block(), convert);
  }
}

void convert(Module &module, c10::ScalarType kind) {
  module.to(kind);
  rewrite_module_constants(module, [kind](const at::Tensor &t) { return t.scalar_type() == kind ? t : t.to(kind); });
}

Module optimized(const Module &original, int passes, c10::ScalarType kind) {
  // optimize_for_inference rewrites an already-frozen module's graph in place, so the work happens on a
  // clone (graphs copied). Its tensors are shared with the original, which no pass below changes: freezing
  // and folding make new constants, and the conversion replaces them. The exception is an already-frozen
  // module converted to another precision: Module::to converts whatever parameters it kept in place, so
  // that clone copies its tensors too.
  bool frozen = !original.hasattr("training");
  Module module = original.clone(/*inplace=*/!(frozen && kind != at::kFloat));
  // Freezing folds batch norms into the convolutions: do that arithmetic in fp32, round once after.
  if ((passes & (FREEZE | OPTIMIZE_FOR_INFERENCE)) && !frozen) module = torch::jit::freeze(module);
  if (kind != at::kFloat) convert(module, kind);
  if (passes & OPTIMIZE_FOR_INFERENCE) {
    module = torch::jit::optimize_for_inference(module);
  } else if (passes & FREEZE) {
    auto graph = module.get_method("forward").graph();
    torch::jit::OptimizeFrozenGraph(graph, true);
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
    convert(*static_cast<Module *>(module), static_cast<c10::ScalarType>(dtype));
    return nullptr;
  } catch (const std::exception &e) {
    return error_text(e.what());
  } catch (...) {
    return error_text(nullptr);
  }
}

// Returns a new module (`new torch::jit::Module`, freed by tch with delete): a clone of `module` with
// `passes` applied and converted to `dtype`; or null with *error set.
void *labeld_optimize(const void *module, int passes, int dtype, char **error) {
  *error = nullptr;
  try {
    return new Module(optimized(*static_cast<const Module *>(module), passes, static_cast<c10::ScalarType>(dtype)));
  } catch (const std::exception &e) {
    *error = error_text(e.what());
  } catch (...) {
    *error = error_text(nullptr);
  }
  return nullptr;
}

// Returns a new module with its own object and graphs, sharing the tensors (`clone(inplace=true)`; a deep
// clone would copy every weight), or null with *error set.
void *labeld_clone(const void *module, char **error) {
  *error = nullptr;
  try {
    return new Module(static_cast<const Module *>(module)->clone(/*inplace=*/true));
  } catch (const std::exception &e) {
    *error = error_text(e.what());
  } catch (...) {
    *error = error_text(nullptr);
  }
  return nullptr;
}

}  // extern "C"
