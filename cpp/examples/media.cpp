#include "media.hpp"

#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>

#include "files.hpp"
#include "npy.hpp"

#ifdef TURBOTRT_WITH_FFMPEG
extern "C" {
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <libavutil/imgutils.h>
#include <libavutil/opt.h>
#include <libswscale/swscale.h>
}
#endif

using turbotrt::Error;

namespace media {

namespace {

[[noreturn]] void fail(const std::string& what) { throw Error(what); }

#ifdef TURBOTRT_WITH_FFMPEG
std::string av_error(int err) {
  char buf[AV_ERROR_MAX_STRING_SIZE] = {0};
  av_strerror(err, buf, sizeof buf);
  return buf;
}

void check(int err, const std::string& what) {
  if (err < 0) fail(what + ": " + av_error(err));
}

// Owners that free FFmpeg's objects on every path out.
struct OutputContext {
  AVFormatContext* oc = nullptr;
  ~OutputContext() {
    if (oc) {
      if (oc->pb) avio_closep(&oc->pb);
      avformat_free_context(oc);
    }
  }
};
struct CodecContext {
  AVCodecContext* c = nullptr;
  ~CodecContext() { avcodec_free_context(&c); }
};
struct Frame {
  AVFrame* f = av_frame_alloc();
  ~Frame() { av_frame_free(&f); }
};
struct Packet {
  AVPacket* p = av_packet_alloc();
  ~Packet() { av_packet_free(&p); }
};
struct Sws {
  SwsContext* s = nullptr;
  ~Sws() { sws_freeContext(s); }
};
struct InputContext {
  AVFormatContext* ic = nullptr;
  ~InputContext() { avformat_close_input(&ic); }
};

void drain(AVCodecContext* c, AVFrame* frame, AVFormatContext* oc, AVStream* st, AVPacket* pkt) {
  check(avcodec_send_frame(c, frame), "encoding a frame");
  for (;;) {
    int err = avcodec_receive_packet(c, pkt);
    if (err == AVERROR(EAGAIN) || err == AVERROR_EOF) return;
    check(err, "encoding a frame");
    // Every frame lasts 1/fps. Older encoders leave the duration unset, and the mp4 muxer then
    // cuts the last frame out of the edit list.
    if (pkt->duration <= 0) pkt->duration = 1;
    av_packet_rescale_ts(pkt, c->time_base, st->time_base);
    pkt->stream_index = st->index;
    check(av_interleaved_write_frame(oc, pkt), "writing the mp4");
  }
}
#endif

// A temp file beside `path` that is removed unless it was renamed into place.
struct Partial {
  std::string tmp, path;
  bool done = false;
  explicit Partial(const std::string& p) : tmp(turbotrt::partial_name(p)), path(p) {}
  void commit() {
    if (std::rename(tmp.c_str(), path.c_str()) != 0) fail("cannot write " + path);
    done = true;
  }
  ~Partial() {
    if (!done) std::remove(tmp.c_str());
  }
};

}  // namespace

bool have_ffmpeg() {
#ifdef TURBOTRT_WITH_FFMPEG
  return true;
#else
  return false;
#endif
}

void quiet_ffmpeg() {
#ifdef TURBOTRT_WITH_FFMPEG
  av_log_set_level(AV_LOG_ERROR);
#endif
}

void write_mp4(const turbotrt::Frames& frames, int fps, const std::string& path) {
#ifdef TURBOTRT_WITH_FFMPEG
  const int w = frames.width, h = frames.height;
  if (frames.count < 1 || w % 2 || h % 2)
    fail("H.264 (yuv420p) needs at least one frame and even sizes, got " + std::to_string(w) + "x" + std::to_string(h));
  const AVCodec* codec = avcodec_find_encoder_by_name("libx264");
  if (!codec) fail("this FFmpeg has no libx264 encoder; write a .y4m instead (--out video.y4m)");
  Partial partial(path);
  OutputContext out;
  check(avformat_alloc_output_context2(&out.oc, nullptr, "mp4", partial.tmp.c_str()), "cannot write " + path);
  AVStream* st = avformat_new_stream(out.oc, nullptr);
  CodecContext cc;
  cc.c = avcodec_alloc_context3(codec);
  if (!st || !cc.c) fail("out of memory writing " + path);
  cc.c->width = w;
  cc.c->height = h;
  cc.c->pix_fmt = AV_PIX_FMT_YUV420P;
  cc.c->time_base = AVRational{1, fps};
  cc.c->framerate = AVRational{fps, 1};
  if (out.oc->oformat->flags & AVFMT_GLOBALHEADER) cc.c->flags |= AV_CODEC_FLAG_GLOBAL_HEADER;
  AVDictionary* opts = nullptr;
  av_dict_set(&opts, "crf", "18", 0);
  int err = avcodec_open2(cc.c, codec, &opts);
  av_dict_free(&opts);
  check(err, "cannot open the H.264 encoder");
  check(avcodec_parameters_from_context(st->codecpar, cc.c), "cannot write " + path);
  st->time_base = cc.c->time_base;
  check(avio_open(&out.oc->pb, partial.tmp.c_str(), AVIO_FLAG_WRITE), "cannot write " + path);
  check(avformat_write_header(out.oc, nullptr), "cannot write " + path);
  Sws sws;
  sws.s = sws_getContext(w, h, AV_PIX_FMT_RGB24, w, h, AV_PIX_FMT_YUV420P, SWS_BILINEAR, nullptr, nullptr, nullptr);
  Frame frame;
  Packet pkt;
  if (!sws.s || !frame.f || !pkt.p) fail("out of memory writing " + path);
  frame.f->format = AV_PIX_FMT_YUV420P;
  frame.f->width = w;
  frame.f->height = h;
  check(av_frame_get_buffer(frame.f, 0), "out of memory writing " + path);
  const size_t stride = size_t(w) * 3;
  for (int i = 0; i < frames.count; ++i) {
    check(av_frame_make_writable(frame.f), "encoding a frame");
    const uint8_t* src[1] = {frames.rgb.data() + size_t(i) * size_t(h) * stride};
    const int src_stride[1] = {int(stride)};
    sws_scale(sws.s, src, src_stride, 0, h, frame.f->data, frame.f->linesize);
    frame.f->pts = i;
    drain(cc.c, frame.f, out.oc, st, pkt.p);
  }
  drain(cc.c, nullptr, out.oc, st, pkt.p);
  check(av_write_trailer(out.oc), "cannot write " + path);
  check(avio_closep(&out.oc->pb), "cannot write " + path);
  partial.commit();
#else
  (void)frames, (void)fps;
  fail("this build has no FFmpeg: write " + path.substr(0, path.rfind('.')) + ".y4m instead (or install FFmpeg's -dev packages and rebuild)");
#endif
}

void write_y4m(const turbotrt::Frames& frames, int fps, const std::string& path) {
  const size_t plane = size_t(frames.width) * size_t(frames.height);
  std::string header = "YUV4MPEG2 W" + std::to_string(frames.width) + " H" + std::to_string(frames.height) + " F" +
                       std::to_string(fps) + ":1 Ip A1:1 C444\n";
  std::vector<uint8_t> out(header.begin(), header.end());
  out.reserve(out.size() + size_t(frames.count) * (6 + 3 * plane));
  std::vector<uint8_t> yuv(3 * plane);
  for (int f = 0; f < frames.count; ++f) {
    const uint8_t* rgb = frames.rgb.data() + size_t(f) * plane * 3;
    for (size_t i = 0; i < plane; ++i) {
      int r = rgb[3 * i], g = rgb[3 * i + 1], b = rgb[3 * i + 2];
      // BT.601 limited range, 8-bit integer approximation (ITU-R BT.601 coefficients scaled by 256)
      yuv[i] = uint8_t(((66 * r + 129 * g + 25 * b + 128) >> 8) + 16);
      yuv[plane + i] = uint8_t(((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128);
      yuv[2 * plane + i] = uint8_t(((112 * r - 94 * g - 18 * b + 128) >> 8) + 128);
    }
    static const char frame_tag[] = "FRAME\n";
    out.insert(out.end(), frame_tag, frame_tag + 6);
    out.insert(out.end(), yuv.begin(), yuv.end());
  }
  turbotrt::write_atomic(path, out.data(), out.size());
}

#ifndef TURBOTRT_WITH_FFMPEG
namespace {

turbotrt::Image read_ppm(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read " + path);
  std::string magic;
  int w = 0, h = 0, maxval = 0;
  in >> magic >> w >> h >> maxval;
  in.get();
  if (magic != "P6" || w < 1 || h < 1 || w > 16384 || h > 16384 || maxval != 255)
    fail(path + ": this build reads binary PPM (P6, 8-bit) images only; convert it with `ffmpeg -i image.png image.ppm`");
  turbotrt::Image img;
  img.width = w;
  img.height = h;
  img.rgb.resize(size_t(w) * size_t(h) * 3);
  if (!in.read(reinterpret_cast<char*>(img.rgb.data()), std::streamsize(img.rgb.size()))) fail(path + ": truncated PPM");
  return img;
}

}  // namespace
#endif

turbotrt::Image read_image(const std::string& path) {
#ifdef TURBOTRT_WITH_FFMPEG
  // As the Python command line reads it: the first decoded frame, converted to rgb24.
  InputContext in;
  check(avformat_open_input(&in.ic, path.c_str(), nullptr, nullptr), "cannot read " + path);
  check(avformat_find_stream_info(in.ic, nullptr), "cannot read " + path);
  const AVCodec* codec = nullptr;
  int index = av_find_best_stream(in.ic, AVMEDIA_TYPE_VIDEO, -1, -1, &codec, 0);
  if (index < 0 || !codec) fail(path + " holds no image");
  CodecContext dec;
  dec.c = avcodec_alloc_context3(codec);
  check(avcodec_parameters_to_context(dec.c, in.ic->streams[index]->codecpar), "cannot read " + path);
  check(avcodec_open2(dec.c, codec, nullptr), "cannot decode " + path);
  Packet pkt;
  Frame frame;
  bool got = false;
  while (!got && av_read_frame(in.ic, pkt.p) >= 0) {
    if (pkt.p->stream_index == index && avcodec_send_packet(dec.c, pkt.p) >= 0) got = avcodec_receive_frame(dec.c, frame.f) >= 0;
    av_packet_unref(pkt.p);
  }
  if (!got && avcodec_send_packet(dec.c, nullptr) >= 0) got = avcodec_receive_frame(dec.c, frame.f) >= 0;
  if (!got) fail("cannot decode an image from " + path);
  turbotrt::Image img;
  img.width = frame.f->width;
  img.height = frame.f->height;
  img.rgb.resize(size_t(img.width) * size_t(img.height) * 3);
  Sws sws;
  sws.s = sws_getContext(img.width, img.height, AVPixelFormat(frame.f->format), img.width, img.height, AV_PIX_FMT_RGB24,
                         SWS_BILINEAR, nullptr, nullptr, nullptr);
  if (!sws.s) fail("cannot convert " + path + " to RGB");
  uint8_t* dst[1] = {img.rgb.data()};
  const int dst_stride[1] = {img.width * 3};
  sws_scale(sws.s, frame.f->data, frame.f->linesize, 0, img.height, dst, dst_stride);
  return img;
#else
  return read_ppm(path);
#endif
}

void write_npy_u8(const turbotrt::Frames& frames, const std::string& path) {
  auto bytes = turbotrt::npy_bytes("|u1", {frames.count, frames.height, frames.width, 3}, frames.rgb.data(), frames.rgb.size());
  turbotrt::write_atomic(path, bytes.data(), bytes.size());
}

void write_npy_f32(const turbotrt::Latents& latents, const std::string& path) {
  auto bytes = turbotrt::npy_bytes("<f4", latents.shape, latents.values.data(), latents.values.size() * sizeof(float));
  turbotrt::write_atomic(path, bytes.data(), bytes.size());
}

}  // namespace media
