"""Edge runtimes the pipeline exports to and measures in (llama.cpp)."""
