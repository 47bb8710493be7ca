#include "files.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <regex>

#include "sha256.hpp"

namespace turbotrt {
namespace {

const size_t MAX_RELPATH = 255;

bool safe_component(const std::string& p) {
  if (p.empty()) return false;
  auto head = [](char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'; };
  if (!head(p[0])) return false;
  for (char c : p)
    if (!head(c) && c != '.' && c != '+' && c != '-') return false;
  return true;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out(1);
  for (char c : s) {
    if (c == sep) out.emplace_back();
    else out.back() += c;
  }
  return out;
}

size_t codepoints(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

}  // namespace

std::string py_path(const std::string& p) {
  std::string root;
  if (p.rfind("//", 0) == 0 && p.rfind("///", 0) != 0) root = "//";
  else if (!p.empty() && p[0] == '/') root = "/";
  std::string out = root;
  for (const auto& part : split(p, '/')) {
    if (part.empty() || part == ".") continue;
    if (out.size() > root.size()) out += '/';
    out += part;
  }
  return out.empty() ? "." : out;
}

std::string py_repr(const std::string& s) {
  bool single = s.find('\'') != std::string::npos, dbl = s.find('"') != std::string::npos;
  char q = (single && !dbl) ? '"' : '\'';
  std::string out(1, q);
  for (unsigned char c : s) {
    if (c == q || c == '\\') { out += '\\'; out += char(c); }
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else out += char(c);  // UTF-8 bytes of printable text, as Python shows them
  }
  return out + q;
}

const std::string& check_relpath(const std::string& rel, const std::string& what) {
  if (rel.empty() || codepoints(rel) > MAX_RELPATH)
    throw UnsafePathError(what + ": " + py_repr(rel) + " is not a relative path");
  bool ok = rel[0] != '/';
  for (const auto& part : split(rel, '/')) ok = ok && safe_component(part);
  if (!ok)
    throw UnsafePathError(what + ": " + py_repr(rel) +
                          " is not a plain relative path inside the bundle (absolute, '..', hidden or unusual characters)");
  return rel;
}

const std::string& check_identifier(const std::string& name, const std::string& what) {
  static const std::regex identifier("[a-z][a-z0-9_]{0,63}");
  if (!std::regex_match(name, identifier))
    throw UnsafePathError(what + ": " + py_repr(name) + " is not a plain name (lowercase letters, digits, '_')");
  return name;
}

std::string inside(const std::string& root, const std::string& rel, const std::string& what) {
  check_relpath(rel, what);
  std::string path = py_path(root);
  for (const auto& part : split(rel, '/')) {
    path = path == "." ? part : path == "/" ? "/" + part : path + "/" + part;
    if (is_symlink(path))
      throw UnsafePathError(what + ": " + py_repr(rel) + " goes through a symlink (" + path +
                            "); bundles hold no symlinks");
  }
  return path;
}

std::optional<std::string> has_symlink(const std::string& root) {
  // os.walk(root, followlinks=False): each folder's sub-folders, then its files, in directory order;
  // then into each sub-folder, top-down. Unreadable folders are skipped, as os.walk does.
  std::vector<std::string> todo{""};
  while (!todo.empty()) {
    std::string rel = todo.front();
    todo.erase(todo.begin());
    std::string dir = rel.empty() ? root : root + "/" + rel;
    DIR* d = opendir(dir.c_str());
    if (!d) continue;
    std::vector<std::string> dirs, files;
    while (dirent* e = readdir(d)) {
      std::string name = e->d_name;
      if (name == "." || name == "..") continue;
      (is_dir(dir + "/" + name) ? dirs : files).push_back(name);
    }
    closedir(d);
    std::vector<std::string> sub;
    for (const auto* group : {&dirs, &files})
      for (const auto& name : *group) {
        std::string r = rel.empty() ? name : rel + "/" + name;
        if (is_symlink(dir + "/" + name)) return r;
        if (group == &dirs) sub.push_back(r);
      }
    todo.insert(todo.begin(), sub.begin(), sub.end());
  }
  return std::nullopt;
}

bool is_dir(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_file(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool is_symlink(const std::string& path) {
  struct stat st;
  return lstat(path.c_str(), &st) == 0 && S_ISLNK(st.st_mode);
}

bool exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

namespace {

int open_nofollow(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) throw Error("cannot read " + path + ": " + std::strerror(errno));
  return fd;
}

}  // namespace

std::vector<uint8_t> read_file(const std::string& path) {
  int fd = open_nofollow(path);
  std::vector<uint8_t> out;
  uint8_t buf[1 << 16];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      close(fd);
      throw Error("cannot read " + path + ": " + std::strerror(err));
    }
    if (n == 0) break;
    out.insert(out.end(), buf, buf + n);
  }
  close(fd);
  return out;
}

std::string sha256_file(const std::string& path) {
  int fd = open_nofollow(path);
  Sha256 h;
  std::vector<uint8_t> buf(1 << 24);
  for (;;) {
    ssize_t n = read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      close(fd);
      throw Error("cannot read " + path + ": " + std::strerror(err));
    }
    if (n == 0) break;
    h.update(buf.data(), size_t(n));
  }
  close(fd);
  return h.hexdigest();
}

std::string partial_name(const std::string& path) {
  size_t slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "" : path.substr(0, slash + 1);
  std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  return dir + "." + name + "." + std::to_string(getpid()) + ".partial";
}

void write_atomic(const std::string& path, const void* data, size_t size) {
  std::string tmp = partial_name(path);
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw Error("cannot write " + path + ": " + std::strerror(errno));
  const char* p = static_cast<const char*>(data);
  size_t left = size;
  while (left) {
    ssize_t n = write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      close(fd);
      unlink(tmp.c_str());
      throw Error("cannot write " + path + ": " + std::strerror(err));
    }
    p += n;
    left -= size_t(n);
  }
  int err = fsync(fd) == 0 ? 0 : errno;
  if (close(fd) != 0 && !err) err = errno;
  if (!err && std::rename(tmp.c_str(), path.c_str()) != 0) err = errno;
  if (err) {
    unlink(tmp.c_str());
    throw Error("cannot write " + path + ": " + std::strerror(err));
  }
}

}  // namespace turbotrt
