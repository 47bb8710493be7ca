#include "tokenizer.hpp"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <utility>

#include "turbotrt/turbotrt.hpp"

namespace turbotrt {

namespace {

#include "unicode_tables.inc"

template <size_t N>
const char32_t* lookup(const std::pair<char32_t, const char32_t*> (&table)[N], char32_t c) {
  auto it = std::lower_bound(std::begin(table), std::end(table), c, [](const auto& e, char32_t v) { return e.first < v; });
  return it != std::end(table) && it->first == c ? it->second : nullptr;
}

bool nfc_may_change(char32_t c) {
  auto it = std::upper_bound(std::begin(NFC_MAY_CHANGE), std::end(NFC_MAY_CHANGE), c,
                             [](char32_t v, const auto& r) { return v < r.first; });
  return it != std::begin(NFC_MAY_CHANGE) && c <= (it - 1)->second;
}

// --- UTF-8 -------------------------------------------------------------------------------------------
std::u32string decode_utf8(const std::string& s) {
  std::u32string out;
  for (size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (!n || i + size_t(n) > s.size()) throw Error("the prompt is not valid UTF-8");
    char32_t cp = n == 1 ? c : c & (0x7F >> n);
    for (int k = 1; k < n; ++k) {
      unsigned char d = static_cast<unsigned char>(s[i + size_t(k)]);
      if ((d >> 6) != 2) throw Error("the prompt is not valid UTF-8");
      cp = (cp << 6) | (d & 0x3F);
    }
    static const char32_t min_of[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_of[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) throw Error("the prompt is not valid UTF-8");
    out += cp;
    i += size_t(n);
  }
  return out;
}

std::string encode_utf8(const std::u32string& s) {
  std::string out;
  for (char32_t c : s) {
    if (c < 0x80) {
      out += char(c);
    } else if (c < 0x800) {
      out += char(0xC0 | (c >> 6));
      out += char(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
      out += char(0xE0 | (c >> 12));
      out += char(0x80 | ((c >> 6) & 0x3F));
      out += char(0x80 | (c & 0x3F));
    } else {
      out += char(0xF0 | (c >> 18));
      out += char(0x80 | ((c >> 12) & 0x3F));
      out += char(0x80 | ((c >> 6) & 0x3F));
      out += char(0x80 | (c & 0x3F));
    }
  }
  return out;
}

// --- the fixes -----------------------------------------------------------------------------------------
// Python's tokenizer.py whitespace class (Unicode White_Space).
bool is_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
         c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// ftfy's remove_control_chars (chardata.CONTROL_CHARS).
bool is_control(char32_t c) {
  return c <= 0x08 || c == 0x0B || (c >= 0x0E && c <= 0x1F) || c == 0x7F || (c >= 0x206A && c <= 0x206F) || c == 0xFEFF ||
         (c >= 0xFFF9 && c <= 0xFFFC);
}

// Common named entities (HTML5); ftfy and html.unescape know ~2,200 (cleaning_is_approximate says
// when a prompt has others).
const std::map<std::u32string, char32_t>& entities() {
  static const std::map<std::u32string, char32_t> table = {
      {U"amp", U'&'},      {U"lt", U'<'},       {U"gt", U'>'},       {U"quot", U'"'},     {U"apos", U'\''},
      {U"nbsp", 0xA0},     {U"hellip", 0x2026}, {U"mdash", 0x2014},  {U"ndash", 0x2013},  {U"lsquo", 0x2018},
      {U"rsquo", 0x2019},  {U"ldquo", 0x201C},  {U"rdquo", 0x201D},  {U"copy", 0xA9},     {U"reg", 0xAE},
      {U"trade", 0x2122},  {U"deg", 0xB0},      {U"middot", 0xB7},   {U"times", 0xD7}};
  return table;
}

bool is_alnum(char32_t c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

// Decode &name; (common names) and &#N; / &#xH; (plain code points); leave anything else as it is.
std::u32string unescape(const std::u32string& s) {
  std::u32string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == U'&') {
      size_t j = i + 1;
      bool numeric = j < s.size() && s[j] == U'#';
      if (numeric) ++j;
      size_t start = j;
      while (j < s.size() && is_alnum(s[j]) && j - start < 24) ++j;
      if (j > start && j < s.size() && s[j] == U';') {
        std::u32string name = s.substr(start, j - start);
        char32_t cp = 0;
        if (numeric) {
          std::string digits(name.begin(), name.end());
          bool hex = digits[0] == 'x' || digits[0] == 'X';
          char* end = nullptr;
          const char* p = digits.c_str() + (hex ? 1 : 0);
          long v = *p ? std::strtol(p, &end, hex ? 16 : 10) : -1;
          if (end && *end == 0 && ((v >= 0x20 && v < 0x7F) || (v >= 0xA0 && v < 0xD800) || (v >= 0xE000 && v <= 0x10FFFF)))
            cp = char32_t(v);
        } else {
          auto it = entities().find(name);
          if (it != entities().end()) cp = it->second;
        }
        if (cp) {
          out += cp;
          i = j;
          continue;
        }
      }
    }
    out += s[i];
  }
  return out;
}

// ftfy's remove_terminal_escapes: ESC [ (digits or ;)* letter.
std::u32string remove_terminal_escapes(const std::u32string& s) {
  std::u32string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == 0x1B && i + 1 < s.size() && s[i + 1] == U'[') {
      size_t j = i + 2;
      while (j < s.size() && ((s[j] >= U'0' && s[j] <= U'9') || s[j] == U';')) ++j;
      if (j < s.size() && ((s[j] >= U'a' && s[j] <= U'z') || (s[j] >= U'A' && s[j] <= U'Z'))) {
        i = j;
        continue;
      }
    }
    out += s[i];
  }
  return out;
}

// The ftfy fixes that matter before sentencepiece, repeated until nothing changes (as fix_text does),
// on one line. html: decode HTML entities (ftfy's unescape_html="auto", see clean_text).
std::u32string ftfy_line(std::u32string s, bool html) {
  for (int round = 0; round < 16; ++round) {
    std::u32string before = s;
    if (html) s = unescape(s);
    std::u32string t;  // fix_latin_ligatures, then fix_character_width
    for (char32_t c : s) {
      const char32_t* r = lookup(LIGATURES, c);
      if (!r) r = lookup(WIDTH, c);
      if (r) t += r;
      else t += c;
    }
    s.clear();
    for (char32_t c : remove_terminal_escapes(t)) {
      if (c == 0x2BC || (c >= 0x2018 && c <= 0x201B)) s += U'\'';  // uncurl_quotes
      else if (c >= 0x201C && c <= 0x201F) s += U'"';
      else if (!is_control(c)) s += c;  // remove_control_chars
    }
    if (s == before) break;
  }
  return s;
}

std::u32string strip(const std::u32string& s) {
  size_t a = 0, b = s.size();
  while (a < b && is_space(s[a])) ++a;
  while (b > a && is_space(s[b - 1])) --b;
  return s.substr(a, b - a);
}

}  // namespace

std::string clean_text(const std::string& text) {
  std::u32string s = decode_utf8(text), fixed;
  // ftfy.fix_text works line by line (segments end after each '\n'). Its unescape_html="auto" turns
  // HTML decoding off at the first line that has a '<', and off it stays for the lines after it.
  bool html = true;
  for (size_t start = 0; start < s.size();) {
    size_t end = s.find(U'\n', start);
    end = end == std::u32string::npos ? s.size() : end + 1;
    std::u32string line = s.substr(start, end - start);
    html = html && line.find(U'<') == std::u32string::npos;
    fixed += ftfy_line(line, html);
    start = end;
  }
  s = strip(unescape(unescape(fixed)));  // html.unescape twice, then strip
  std::u32string out;
  for (char32_t c : s) {
    if (!is_space(c)) out += c;
    else if (out.empty() || out.back() != U' ') out += U' ';
  }
  return encode_utf8(strip(out));
}

bool cleaning_is_approximate(const std::string& text) {
  for (char32_t c : decode_utf8(text)) {
    if (c >= 0x80 && c <= 0xFF && c != 0xA0) return true;  // where mojibake and C1 controls live
    // ftfy ends with NFC, which C++ does not do; check what the width and ligature maps make, too
    // (halfwidth katakana map to combining voicing marks).
    const char32_t* mapped = lookup(LIGATURES, c);
    if (!mapped) mapped = lookup(WIDTH, c);
    if (nfc_may_change(c)) return true;
    for (const char32_t* m = mapped; m && *m; ++m)
      if (nfc_may_change(*m)) return true;
  }
  for (size_t i = 0; (i = text.find('&', i)) != std::string::npos; ++i) {
    size_t j = i + 1;
    bool numeric = j < text.size() && text[j] == '#';
    if (numeric) ++j;
    size_t start = j;
    while (j < text.size() && is_alnum(char32_t(static_cast<unsigned char>(text[j])))) ++j;
    if (j == start) continue;  // a lone '&' is left alone by everyone
    if (numeric || j >= text.size() || text[j] != ';') return true;  // html.unescape also decodes "&copy" and the like
    if (!entities().count(std::u32string(text.begin() + long(start), text.begin() + long(j)))) return true;
  }
  return false;
}

Tokenizer::Tokenizer(const std::string& path, int64_t text_len) : sp_(new sentencepiece::SentencePieceProcessor), text_len_(text_len) {
  if (text_len < 1) throw Error("text_len must be >= 1, got " + std::to_string(text_len));
  size_t dot = path.rfind('.');
  std::string ext = dot == std::string::npos ? "" : path.substr(dot);
  if (ext == ".json")
    throw Error(path + ": the C++ runtime reads sentencepiece .model tokenizers, not tokenizer.json; export the bundle "
                "with --tokenizer spiece.model");
  auto status = sp_->Load(path);
  if (!status.ok())
    throw Error(path + ": sentencepiece's C++ library cannot read this tokenizer (" + status.ToString() +
                "); export the bundle with a sentencepiece .model (--tokenizer spiece.model)");
  eos_ = sp_->eos_id();
  if (eos_ < 0) throw Error(path + ": sentencepiece model defines no EOS piece");
}

Tokenizer::~Tokenizer() = default;

std::vector<int> Tokenizer::encode(const std::string& text) const {
  std::vector<int> ids;
  auto status = sp_->Encode(clean_text(text), &ids);
  if (!status.ok()) throw Error("sentencepiece cannot encode the prompt: " + status.ToString());
  return ids;
}

void Tokenizer::operator()(const std::string& text, std::vector<int64_t>& ids, std::vector<int64_t>& mask) const {
  std::vector<int> pieces = encode(text);
  ids.assign(size_t(text_len_), 0);
  mask.assign(size_t(text_len_), 0);
  size_t n = std::min(pieces.size(), size_t(text_len_ - 1));
  for (size_t i = 0; i < n; ++i) ids[i] = pieces[i];
  ids[n] = eos_;
  for (size_t i = 0; i <= n; ++i) mask[i] = 1;
}

}  // namespace turbotrt
