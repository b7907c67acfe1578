# polyak_cuda_architectures(VERSION OUT): the GPU code a build with CUDA
# toolkit VERSION makes when CMAKE_CUDA_ARCHITECTURES is not given: SASS
# for every architecture from Volta (V100, sm_70) or, where the toolkit has
# dropped Volta (CUDA 13), Turing (T4, sm_75) on, through Ampere (sm_80)
# to Hopper (sm_90), plus Hopper's PTX, which the driver compiles for newer
# cards (Blackwell) at load. Used by CMakeLists.txt; tests/CMakeLists.txt
# runs it in script mode (cmake -DVERSION=... -P) for both toolkit majors.
function(polyak_cuda_architectures version out)
  if(version VERSION_LESS 13.0)
    set(archs 70-real 75-real 80-real 90)
  else()
    set(archs 75-real 80-real 90)
  endif()
  set(${out} ${archs} PARENT_SCOPE)
endfunction()

if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  polyak_cuda_architectures("${VERSION}" archs)
  message("${archs}")
endif()
