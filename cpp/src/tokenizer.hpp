// The umT5 tokenizer as Wan calls it (turbotrt/core/tokenizer.py): clean the prompt, encode it with
// sentencepiece's C++ library, keep text_len - 1 pieces, append EOS, right-pad with 0.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace turbotrt {

// Wan's clean="whitespace": ftfy.fix_text, html.unescape twice, strip, collapse Unicode whitespace.
// Of ftfy's fixes this applies HTML entities (the common ones, where the line has no '<'), Latin
// ligatures, full- and halfwidth forms, curly quotes, terminal escapes and control characters, with
// ftfy's tables (src/unicode_tables.inc). It does not repair mojibake and does not compose to NFC.
std::string clean_text(const std::string& text);
// Whether clean_text may differ from Python's for this prompt: it has HTML entities beyond the
// common ones, Latin-1 supplement characters (where ftfy repairs mojibake), or characters that NFC
// composes or reorders.
bool cleaning_is_approximate(const std::string& text);

class Tokenizer {
 public:
  // A sentencepiece .model; Error (one line) for anything sentencepiece's C++ library cannot read.
  Tokenizer(const std::string& path, int64_t text_len);
  ~Tokenizer();

  std::vector<int> encode(const std::string& text) const;  // cleaned, unpadded, without EOS
  // ids and mask, int64 [text_len]: pieces[:text_len - 1] + [EOS], right-padded with 0.
  void operator()(const std::string& text, std::vector<int64_t>& ids, std::vector<int64_t>& mask) const;

  int eos_id() const { return eos_; }
  int64_t text_len() const { return text_len_; }

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  int64_t text_len_;
  int eos_ = -1;
};

}  // namespace turbotrt
