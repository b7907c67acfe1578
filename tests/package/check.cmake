# The Python package's build (cmake/polyak_package.cmake,
# cmake/polyak_cuda_wheels.cmake), run by ctest in script mode:
#   -DCHECK=wheel_toolkit: a toolkit laid out as NVIDIA's wheels lay it (bin/nvcc,
#     lib/libcudart.so.13 without libcudart.so) hands FindCUDAToolkit the
#     versioned files, and leaves a toolkit with the plain names alone.
#   -DCHECK=torch_cuda: configured as pip install . does (SKBUILD) with the
#     project's nvcc (CUDA_COMPILER, major MAJOR) beside a fake torch
#     (torch/version.py only) for another CUDA major, the build refuses, naming
#     both; beside one for MAJOR it names the libraries it builds.
# SOURCE_DIR, WORK_DIR; PYTHON for torch_cuda.
file(REMOVE_RECURSE "${WORK_DIR}")
if(CHECK STREQUAL "wheel_toolkit")
  set(root "${WORK_DIR}/nvidia/cu13")
  file(WRITE "${root}/bin/nvcc" "")
  file(WRITE "${root}/lib/libcudart.so.13" "")
  file(WRITE "${root}/lib/libcublas.so.13" "")
  execute_process(COMMAND ${CMAKE_COMMAND} -DCMAKE_CUDA_COMPILER=${root}/bin/nvcc
                          -P ${SOURCE_DIR}/cmake/polyak_cuda_wheels.cmake OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT out MATCHES "cudart: [^\n]*/lib/libcudart\\.so\\.13" OR NOT out MATCHES "cublas: [^\n]*/lib/libcublas\\.so\\.13")
    message(FATAL_ERROR "the wheels' versioned libraries were not taken:\n${out}")
  endif()
  file(WRITE "${root}/lib/libcudart.so" "") # a toolkit's plain name: FindCUDAToolkit finds it itself
  execute_process(COMMAND ${CMAKE_COMMAND} -DCMAKE_CUDA_COMPILER=${root}/bin/nvcc
                          -P ${SOURCE_DIR}/cmake/polyak_cuda_wheels.cmake OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(out MATCHES "cudart:")
    message(FATAL_ERROR "a plain libcudart.so was passed over:\n${out}")
  endif()
  message("wheel toolkit: ok")
elseif(CHECK STREQUAL "torch_cuda")
  if(MAJOR EQUAL 12)
    set(other 13)
  else()
    set(other 12)
  endif()
  foreach(major ${other} ${MAJOR})
    set(torch "${WORK_DIR}/torch${major}")
    file(WRITE "${torch}/torch/__init__.py" "raise ImportError('the build must not import torch')\n")
    file(WRITE "${torch}/torch/version.py" "from typing import Optional\ncuda: Optional[str] = '${major}.9'\n")
    execute_process(
      COMMAND ${CMAKE_COMMAND} -E env PYTHONPATH=${torch}
              ${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/build${major} -DSKBUILD=ON
              -DPython_EXECUTABLE=${PYTHON} -DCMAKE_CUDA_COMPILER=${CUDA_COMPILER} -DPOLYAK_WITH_NCCL=OFF
              -DPOLYAK_BUILD_TESTS=OFF -DPOLYAK_BUILD_EXAMPLES=OFF -DPOLYAK_BUILD_BENCH=OFF
      RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
    string(REGEX REPLACE "[ \n]+" " " flat "${out}")
    if(major EQUAL other)
      if(rc EQUAL 0 OR NOT flat MATCHES "the installed torch uses CUDA ${other} \\(torch.version.cuda ${other}\\.9\\)")
        message(FATAL_ERROR "beside a torch for CUDA ${other} the build did not refuse:\n${out}")
      endif()
    elseif(NOT rc EQUAL 0 OR NOT flat MATCHES "libpolyak_cpu.so and libpolyak_cuda${MAJOR}.so \\(torch's CUDA ${MAJOR}\\.9\\)")
      message(FATAL_ERROR "beside a torch for CUDA ${MAJOR} the build did not configure:\n${out}")
    endif()
  endforeach()
  message("torch cuda: ok")
else()
  message(FATAL_ERROR "CHECK=${CHECK}: wheel_toolkit or torch_cuda")
endif()
