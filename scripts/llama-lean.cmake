# Read by CMake right after llama.cpp's own project() (CMAKE_PROJECT_llama.cpp_INCLUDE, set by
# scripts/llama-wheel). llama-cpp-python forces LLAMA_BUILD_COMMON on, yet nothing it ships
# loads libllama-common: the library of llama.cpp's command-line tools (argument parsing, chat
# templates, downloads over its HTTP client). It was more than half of the build left once the
# multimodal library is off. A variable of this directory shadows the forced cache entry here
# and below (common/, vendor/cpp-httplib), and nowhere else.
set(LLAMA_BUILD_COMMON OFF)
