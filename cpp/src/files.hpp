// Paths that stay inside their folder, files read without following symlinks, files written
// atomically. Mirrors turbotrt/core/files.py (same rules, same messages).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "turbotrt/turbotrt.hpp"

namespace turbotrt {

// A path from an untrusted file that would leave its folder (or is not plain).
class UnsafePathError : public Error {
 public:
  using Error::Error;
};

// How Python prints a pathlib.Path made from `p` ("a//b/./c/" -> "a/b/c").
std::string py_path(const std::string& p);
// Python's repr() of a str ('it''s' -> "it's", quotes and escapes as Python chooses them).
std::string py_repr(const std::string& s);

// `rel` as a safe relative POSIX path, else UnsafePathError naming `what`: non-empty, at most 255
// characters, relative, normalised, each component plain ([A-Za-z0-9_][A-Za-z0-9_.+-]*).
const std::string& check_relpath(const std::string& rel, const std::string& what);
// A plain lowercase name ([a-z][a-z0-9_]{0,63}), else UnsafePathError.
const std::string& check_identifier(const std::string& name, const std::string& what);
// root/rel after check_relpath and checking that no component from root down is a symlink.
std::string inside(const std::string& root, const std::string& rel, const std::string& what);
// The first symlink under root (top-down, as os.walk visits), relative to root, if any.
std::optional<std::string> has_symlink(const std::string& root);

bool is_dir(const std::string& path);      // follows symlinks, as Path.is_dir
bool is_file(const std::string& path);     // follows symlinks, as Path.is_file
bool is_symlink(const std::string& path);  // lstat
bool exists(const std::string& path);

// The whole file, opened with O_NOFOLLOW. Throws Error("cannot read <path>: <strerror>").
std::vector<uint8_t> read_file(const std::string& path);
// sha256 hex digest of a file, opened with O_NOFOLLOW and read in chunks.
std::string sha256_file(const std::string& path);
// Write through a temp file in the same folder, fsync, rename over `path`.
void write_atomic(const std::string& path, const void* data, size_t size);
// The temp name write_atomic uses for `path` (for writers that need a file name, e.g. FFmpeg).
std::string partial_name(const std::string& path);

}  // namespace turbotrt
