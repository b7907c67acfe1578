// test_checkpoint_streams.cpp: what is not a regular file. polyak_load
// refuses FIFOs, sockets, devices and directories at once, saying what they
// are; polyak_load_fd reads a checkpoint streamed through a pipe, exactly
// its bytes.
#include "checkpoint_util.h"

#include <sys/socket.h>
#include <sys/un.h>

#include <future>

using namespace polyak_test;

namespace {

// polyak_load(path) in a thread: its status, or a failure if it has not
// returned within 5 s (a FIFO is then opened for writing, to free it).
polyak_status load_within_5s(polyak_t *p, const std::string &path)
{
  auto load = std::async(std::launch::async, [&] { return polyak_load(p, path.c_str()); });
  if (load.wait_for(std::chrono::seconds(5)) == std::future_status::ready)
    return load.get();
  ADD_FAILURE() << "polyak_load(\"" << path << "\") blocks";
  int writer = open(path.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
  polyak_status status = load.get();
  if (writer >= 0)
    close(writer);
  return status;
}

TEST(CheckpointStreams, LoadRefusesWhatIsNotARegularFileAtOnceAndSaysWhatItIs)
{
  TempDir dir;
  Model m;
  m.step(1);
  Snapshot before = m.state();
  const std::string fifo = dir.file("fifo"), socket_path = dir.file("socket");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0644), 0) << strerror(errno);
  int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un address = {};
  address.sun_family = AF_UNIX;
  std::snprintf(address.sun_path, sizeof address.sun_path, "%s", socket_path.c_str());
  ASSERT_EQ(bind(listener, (const sockaddr *)&address, sizeof address), 0) << strerror(errno);
  const std::pair<std::string, std::string> cases[] = {
      {fifo, " is a FIFO (named pipe), not a regular file (to read a checkpoint from a pipe, pass its fd to "
             "polyak_load_fd)"},
      {socket_path, " is a socket, not a regular file (to read a checkpoint from a pipe, pass its fd to "
                    "polyak_load_fd)"},
      {"/dev/null", " is a character device, not a regular file"},
      {dir.path, " is a directory, not a regular file"},
  };
  for (const auto &[path, what] : cases) {
    EXPECT_EQ(load_within_5s(m.h.get(), path), POLYAK_ERR_IO) << path;
    EXPECT_EQ(polyak_last_error(m.h.get()), "polyak_load: " + path + what);
  }
  close(listener);
  // /proc's files are regular and say they hold 0 bytes
  EXPECT_EQ(load_within_5s(m.h.get(), "/proc/self/status"), POLYAK_ERR_FORMAT);
  EXPECT_TRUE(contains(polyak_last_error(m.h.get()), "the 0-byte file (empty, or of a size the system does not say) "
                                                     "is too short to be safetensors"))
      << polyak_last_error(m.h.get());
  EXPECT_TRUE(m.state() == before);
}

// Writes `bytes` into a pipe from a thread; the read end is `read_fd`.
// A reader that stops early (a failing test) ends the writer with EPIPE.
struct Pipe {
  int ends[2] = {-1, -1};
  std::thread writer;
  explicit Pipe(std::vector<char> bytes)
  {
    signal(SIGPIPE, SIG_IGN);
    EXPECT_EQ(pipe2(ends, O_CLOEXEC), 0);
    writer = std::thread([this, bytes = std::move(bytes)] {
      size_t done = 0;
      while (done < bytes.size()) {
        ssize_t n = write(ends[1], bytes.data() + done, bytes.size() - done);
        if (n <= 0)
          break;
        done += (size_t)n;
      }
      close(ends[1]);
    });
  }
  int read_fd() const
  {
    return ends[0];
  }
  // What is left in the pipe once the writer is done.
  std::string rest()
  {
    writer.join();
    std::string out;
    char buffer[4096];
    for (ssize_t n; (n = read(ends[0], buffer, sizeof buffer)) > 0;)
      out.append(buffer, (size_t)n);
    return out;
  }
  ~Pipe()
  {
    close(ends[0]);
    if (writer.joinable())
      writer.join();
  }
};

TEST(CheckpointStreams, LoadFdReadsACheckpointThroughAPipeAndNotOneByteMore)
{
  Model source, target;
  for (int64_t s : {1, 4})
    source.step(s);
  std::vector<char> stream = save_to_memory(source.h.get());
  ASSERT_GT(stream.size(), 65536u) << "more than a pipe's buffer: the writer waits for the reader";
  const std::string after = "the trainer's state after the EMA";
  stream.insert(stream.end(), after.begin(), after.end());
  Pipe pipe(stream);
  ASSERT_EQ(polyak_load_fd(target.h.get(), pipe.read_fd()), POLYAK_OK) << polyak_last_error(target.h.get());
  EXPECT_TRUE(target.state() == source.state());
  EXPECT_EQ(pipe.rest(), after);
}

TEST(CheckpointStreams, APipeResumesBitIdentically)
{
  std::vector<char> at5;
  expect_exact_resume([&](polyak_t *p) { at5 = save_to_memory(p); },
                      [&](polyak_t *p) {
                        Pipe pipe(at5);
                        ASSERT_EQ(polyak_load_fd(p, pipe.read_fd()), POLYAK_OK) << polyak_last_error(p);
                      });
}

TEST(CheckpointStreams, ABrokenOrShortStreamChangesNothing)
{
  Model source, target;
  source.step(2);
  target.step(1);
  Snapshot before = target.state();
  std::vector<char> good = save_to_memory(source.h.get());
  std::vector<char> flipped = good;
  flipped[flipped.size() / 2] ^= 0x20;
  std::vector<char> cut(good.begin(), good.begin() + (long)good.size() - 100);
  const std::pair<std::vector<char>, std::string> cases[] = {
      {flipped, "polyak_load_fd: the checksum is not the one recorded"},
      {cut, "of the pipe on fd "},
      {std::vector<char>(), "cannot read byte 0 of the pipe on fd "},
  };
  for (const auto &[bytes, message] : cases) {
    Pipe pipe(bytes);
    EXPECT_NE(polyak_load_fd(target.h.get(), pipe.read_fd()), POLYAK_OK);
    EXPECT_TRUE(contains(polyak_last_error(target.h.get()), message)) << polyak_last_error(target.h.get());
    EXPECT_TRUE(target.state() == before);
  }
  target.step(2); // still works
}

} // namespace
