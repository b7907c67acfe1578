# The Python package's libraries (pip install ., included by CMakeLists.txt
# under scikit-build-core): libpolyak_cpu.so always, and with the CUDA
# backend libpolyak_cuda<major>.so, the CUDA major of the nvcc that builds
# it. One build makes one CUDA major; a package for another is built with
# that major's nvcc (CUDACXX). Where the build sees torch (pip install
# --no-build-isolation), torch's CUDA major must be nvcc's, or torch would
# load a library the package cannot use (-DPOLYAK_IGNORE_TORCH_CUDA=ON, or
# the environment variable of that name, builds it anyway).
option(POLYAK_IGNORE_TORCH_CUDA "Build the CUDA library whatever CUDA the installed torch uses" OFF)

set_target_properties(polyak PROPERTIES INSTALL_RPATH_USE_LINK_PATH ON PUBLIC_HEADER "")
if(POLYAK_HAVE_CUDA)
  set(polyak_cuda_major ${CUDAToolkit_VERSION_MAJOR})
  set_target_properties(polyak PROPERTIES OUTPUT_NAME polyak_cuda${polyak_cuda_major})

  # torch's CUDA, read from torch/version.py without importing torch
  set(polyak_python ${Python_EXECUTABLE})
  if(NOT polyak_python)
    set(polyak_python ${PYTHON_EXECUTABLE})
  endif()
  set(torch_cuda "")
  if(polyak_python)
    execute_process(
      COMMAND ${polyak_python} -c [[
import importlib.util, os, re
spec = importlib.util.find_spec("torch")
path = os.path.join(spec.submodule_search_locations[0], "version.py") if spec and spec.submodule_search_locations else ""
text = open(path).read() if os.path.isfile(path) else ""
found = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([0-9.]+)['\"]", text, re.M)
print(("cuda " + found.group(1)) if found else ("cpu" if text else ""), end="")
]]
      OUTPUT_VARIABLE torch_cuda ERROR_QUIET RESULT_VARIABLE torch_rc)
  endif()
  if(torch_cuda MATCHES "^cuda (([0-9]+)[0-9.]*)")
    set(torch_major ${CMAKE_MATCH_2})
    set(torch_cuda ${CMAKE_MATCH_1})
    if(NOT torch_major EQUAL polyak_cuda_major AND NOT POLYAK_IGNORE_TORCH_CUDA)
      message(FATAL_ERROR "polyak: the installed torch uses CUDA ${torch_major} (torch.version.cuda "
              "${torch_cuda}), and nvcc ${CMAKE_CUDA_COMPILER_VERSION} would build libpolyak_cuda${polyak_cuda_major}.so, "
              "which cannot load beside it: build with a CUDA ${torch_major} nvcc (CUDACXX=/path/to/nvcc pip install .), "
              "or set POLYAK_IGNORE_TORCH_CUDA=ON to build it anyway (the package then runs on the CPU beside this torch)")
    endif()
    message(STATUS "polyak: package libraries libpolyak_cpu.so and libpolyak_cuda${polyak_cuda_major}.so "
                   "(torch's CUDA ${torch_cuda})")
  else()
    message(STATUS "polyak: package libraries libpolyak_cpu.so and libpolyak_cuda${polyak_cuda_major}.so "
                   "(no torch with CUDA visible to the build; the package checks at import)")
  endif()

  # the CPU library: the same C sources without the CUDA backend
  add_library(polyak_cpu SHARED ${POLYAK_CORE_SOURCES})
  set_target_properties(polyak_cpu PROPERTIES POSITION_INDEPENDENT_CODE ON C_VISIBILITY_PRESET hidden
                                              INSTALL_RPATH_USE_LINK_PATH ON)
  target_include_directories(polyak_cpu PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/include ${PROJECT_BINARY_DIR}/include
    ${CMAKE_CURRENT_SOURCE_DIR}/kernels ${CMAKE_CURRENT_SOURCE_DIR}/src ${JANSSON_INCLUDE_DIR} ${XXHASH_INCLUDE_DIR})
  target_compile_definitions(polyak_cpu PRIVATE _GNU_SOURCE)
  target_link_libraries(polyak_cpu PRIVATE m Threads::Threads ${JANSSON_LIBRARY})
  install(TARGETS polyak_cpu LIBRARY DESTINATION polyak)
else()
  set_target_properties(polyak PROPERTIES OUTPUT_NAME polyak_cpu)
  message(STATUS "polyak: package library libpolyak_cpu.so (no CUDA)")
endif()
install(TARGETS polyak LIBRARY DESTINATION polyak)
