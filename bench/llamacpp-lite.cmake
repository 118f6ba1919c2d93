# `make bench` builds llama-cpp-python from source with this file included right after llama.cpp's project()
# (CMAKE_PROJECT_llama.cpp_INCLUDE). llama-cpp-python forces llama.cpp's `common` library on, which only its
# multimodal tools use (turned off too: -DLLAVA_BUILD=OFF); the bench loads libllama and ggml alone, and
# `common` was about half of the build's ~6.5 minutes on 2 cores. A normal variable shadows the forced cache
# entry within llama.cpp's directory (policy CMP0077: option() then keeps it).
set(LLAMA_BUILD_COMMON OFF)
