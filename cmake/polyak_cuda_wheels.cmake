# A CUDA toolkit from NVIDIA's Python wheels (pip install nvidia-cuda-nvcc
# nvidia-cuda-runtime nvidia-cublas: CUDA 13's compiler and libraries under
# site-packages/nvidia/cu13, with CUDACXX=.../nvidia/cu13/bin/nvcc) has the
# versioned libraries only (libcudart.so.13, no libcudart.so for the linker
# to find): where the compiler's lib/ has a versioned one and no plain one,
# FindCUDAToolkit is handed its path, and the link names its soname.
# Included by CMakeLists.txt before find_package(CUDAToolkit).
get_filename_component(polyak_cuda_lib "${CMAKE_CUDA_COMPILER}" DIRECTORY)
get_filename_component(polyak_cuda_lib "${polyak_cuda_lib}/../lib" ABSOLUTE)
foreach(name cudart cublas cublasLt)
  file(GLOB polyak_found "${polyak_cuda_lib}/lib${name}.so.[0-9]*")
  if(polyak_found AND NOT EXISTS "${polyak_cuda_lib}/lib${name}.so")
    list(GET polyak_found 0 polyak_found)
    if(name STREQUAL "cudart") # what FindCUDAToolkit looks for first
      set(CUDA_CUDART "${polyak_found}" CACHE FILEPATH "the CUDA runtime (a wheel's versioned file)")
    endif()
    set(CUDA_${name}_LIBRARY "${polyak_found}" CACHE FILEPATH "${name} (a wheel's versioned file)")
    message(STATUS "polyak: ${name}: ${polyak_found} (a versioned library without its plain name, as in NVIDIA's wheels)")
  endif()
endforeach()
