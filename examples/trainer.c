/*
 * trainer.c: a small C trainer, llm.c style, with polyak added the way
 * such a trainer would add it: the parameters live in one arena of views
 * (polyak_add_arena), two averages are kept (timm's warmup EMA and EDM2's
 * power EMA), held-out loss is measured with each (polyak_store, then
 * polyak_copy_to_params, then polyak_restore), and the EMA travels inside
 * the trainer's own state file (polyak_save_fd between the trainer's
 * records, polyak_load_fd on resume).
 *
 *   polyak_trainer [--steps N] [--stop-after M] [--state FILE] [--resume FILE]
 *
 * The model: an MLP that reads 8 characters of sums like "31+7=38;" and
 * predicts the next one (embedding, tanh layer, softmax), trained by AdamW
 * on minibatches drawn from a seeded generator. --stop-after M saves the
 * state at step M and exits, as a killed run that checkpointed would;
 * --resume continues from such a file. The last line is a digest of the
 * params and both averages: a resumed run prints the same one as a run
 * that never stopped.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <polyak.h>

/* ---- data: "a+b=c;" with a, b in 0..99 --------------------------------- */

#define VOCAB       13 /* 0-9 + = ; */
#define CTX         8  /* characters of context */
#define EMB         8
#define HIDDEN      64
#define BATCH       32
#define TRAIN_CHARS 60000
#define VAL_CHARS   6000

static uint64_t next_random(uint64_t *state) /* xorshift64* */
{
  *state ^= *state >> 12;
  *state ^= *state << 25;
  *state ^= *state >> 27;
  return *state * 0x2545F4914F6CDD1DULL;
}

static double uniform(uint64_t *state)
{
  return (double)(next_random(state) >> 11) / 9007199254740992.0;
}

static int token(char c)
{
  return c >= '0' && c <= '9' ? c - '0' : c == '+' ? 10 : c == '=' ? 11 : 12;
}

/* num_chars tokens of sums drawn from `seed` */
static void make_text(unsigned char *text, int num_chars, uint64_t seed)
{
  char sample[16];
  int filled = 0;
  while (filled < num_chars) {
    int a = (int)(uniform(&seed) * 100), b = (int)(uniform(&seed) * 100);
    int len = snprintf(sample, sizeof sample, "%d+%d=%d;", a, b, a + b);
    for (int i = 0; i < len && filled < num_chars; i++)
      text[filled++] = (unsigned char)token(sample[i]);
  }
}

/* ---- the model: every parameter in one arena, as llm.c keeps them ------- */

enum { WTE, W1, B1, W2, B2, NUM_TENSORS };
static const char *tensor_names[NUM_TENSORS] = {"wte", "w1", "b1", "w2", "b2"};
static const int64_t tensor_shapes[NUM_TENSORS][2] = {
    {VOCAB, EMB}, {CTX * EMB, HIDDEN}, {HIDDEN, 1}, {HIDDEN, VOCAB}, {VOCAB, 1}};

typedef struct {
  float *memory; /* the arena: wte (VOCAB, EMB), w1 (CTX*EMB, HIDDEN), b1 (HIDDEN),
                    w2 (HIDDEN, VOCAB), b2 (VOCAB), end to end */
  float *t[NUM_TENSORS];
  size_t num_params;
} arena;

static void arena_init(arena *a)
{
  a->num_params = 0;
  for (int i = 0; i < NUM_TENSORS; i++)
    a->num_params += (size_t)(tensor_shapes[i][0] * tensor_shapes[i][1]);
  a->memory = calloc(a->num_params, sizeof(float));
  float *at = a->memory;
  for (int i = 0; i < NUM_TENSORS; i++) {
    a->t[i] = at;
    at += tensor_shapes[i][0] * tensor_shapes[i][1];
  }
}

/* Loss of predicting text[pos] from text[pos - CTX .. pos); with grad,
 * accumulates d(loss)/d(params) * scale into it. */
static double example(const arena *p, const unsigned char *text, int pos, arena *grad, float scale)
{
  float x[CTX * EMB], h[HIDDEN], logits[VOCAB];
  for (int c = 0; c < CTX; c++)
    memcpy(x + c * EMB, p->t[WTE] + text[pos - CTX + c] * EMB, EMB * sizeof(float));
  for (int j = 0; j < HIDDEN; j++) {
    float sum = p->t[B1][j];
    for (int i = 0; i < CTX * EMB; i++)
      sum += x[i] * p->t[W1][i * HIDDEN + j];
    h[j] = tanhf(sum);
  }
  float max = -INFINITY;
  for (int v = 0; v < VOCAB; v++) {
    float sum = p->t[B2][v];
    for (int j = 0; j < HIDDEN; j++)
      sum += h[j] * p->t[W2][j * VOCAB + v];
    logits[v] = sum;
    max = fmaxf(max, sum);
  }
  double total = 0.0;
  for (int v = 0; v < VOCAB; v++)
    total += exp((double)(logits[v] - max));
  int y = text[pos];
  double loss = log(total) - (double)(logits[y] - max);
  if (!grad)
    return loss;
  float dlogits[VOCAB], dh[HIDDEN] = {0}, dx[CTX * EMB] = {0};
  for (int v = 0; v < VOCAB; v++)
    dlogits[v] = scale * ((float)(exp((double)(logits[v] - max)) / total) - (v == y));
  for (int j = 0; j < HIDDEN; j++)
    for (int v = 0; v < VOCAB; v++) {
      grad->t[W2][j * VOCAB + v] += h[j] * dlogits[v];
      dh[j] += p->t[W2][j * VOCAB + v] * dlogits[v];
    }
  for (int v = 0; v < VOCAB; v++)
    grad->t[B2][v] += dlogits[v];
  for (int j = 0; j < HIDDEN; j++) {
    float dpre = dh[j] * (1.0f - h[j] * h[j]);
    grad->t[B1][j] += dpre;
    for (int i = 0; i < CTX * EMB; i++) {
      grad->t[W1][i * HIDDEN + j] += x[i] * dpre;
      dx[i] += p->t[W1][i * HIDDEN + j] * dpre;
    }
  }
  for (int c = 0; c < CTX; c++)
    for (int e = 0; e < EMB; e++)
      grad->t[WTE][text[pos - CTX + c] * EMB + e] += dx[c * EMB + e];
  return loss;
}

static double mean_loss(const arena *p, const unsigned char *text, int num_chars)
{
  double sum = 0.0;
  for (int pos = CTX; pos < num_chars; pos++)
    sum += example(p, text, pos, NULL, 0.0f);
  return sum / (num_chars - CTX);
}

/* ---- the trainer's state: step, sampler, params, AdamW moments ---------- */

typedef struct {
  int64_t step;
  uint64_t rng;
  arena params, grad, m, v;
} trainer;

static void adamw_step(trainer *tr)
{
  const float lr = 3e-3f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.01f;
  float m_scale = 1.0f / (1.0f - powf(beta1, (float)tr->step));
  float v_scale = 1.0f / (1.0f - powf(beta2, (float)tr->step));
  for (size_t i = 0; i < tr->params.num_params; i++) {
    float g = tr->grad.memory[i];
    float m = tr->m.memory[i] = beta1 * tr->m.memory[i] + (1.0f - beta1) * g;
    float v = tr->v.memory[i] = beta2 * tr->v.memory[i] + (1.0f - beta2) * g * g;
    tr->params.memory[i] -= lr * (m * m_scale / (sqrtf(v * v_scale) + eps) + weight_decay * tr->params.memory[i]);
  }
}

static double train_step(trainer *tr, const unsigned char *text)
{
  memset(tr->grad.memory, 0, tr->grad.num_params * sizeof(float));
  double loss = 0.0;
  for (int b = 0; b < BATCH; b++) {
    int pos = CTX + (int)(uniform(&tr->rng) * (TRAIN_CHARS - CTX));
    loss += example(&tr->params, text, pos, &tr->grad, 1.0f / BATCH);
  }
  tr->step += 1;
  adamw_step(tr);
  return loss / BATCH;
}

/* ---- the state file: the trainer's records with the EMA between them ---- */

#define STATE_MAGIC "TRAINER1"

/* All num_bytes written from data (writing) or read into it: 0, else -1. */
static int transfer_all(int fd, void *data, size_t num_bytes, int writing)
{
  char *at = data;
  while (num_bytes > 0) {
    ssize_t done = writing ? write(fd, at, num_bytes) : read(fd, at, num_bytes);
    if (done < 0 && errno == EINTR)
      continue;
    if (done <= 0)
      return -1;
    at += done, num_bytes -= (size_t)done;
  }
  return 0;
}

static int write_all(int fd, const void *data, size_t num_bytes)
{
  return transfer_all(fd, (void *)data, num_bytes, 1);
}
static int read_all(int fd, void *data, size_t num_bytes)
{
  return transfer_all(fd, data, num_bytes, 0);
}

/* magic, step, sampler, params, m, v, the EMA (polyak's own format, at the
 * file's offset), magic again; written to path.tmp, then renamed over path */
static int save_state(const trainer *tr, polyak_t *ema, const char *path)
{
  char tmp[4096];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  size_t array_bytes = tr->params.num_params * sizeof(float);
  polyak_status s = POLYAK_OK;
  int bad = fd < 0 || write_all(fd, STATE_MAGIC, 8) || write_all(fd, &tr->step, sizeof tr->step) ||
            write_all(fd, &tr->rng, sizeof tr->rng) || write_all(fd, tr->params.memory, array_bytes) ||
            write_all(fd, tr->m.memory, array_bytes) || write_all(fd, tr->v.memory, array_bytes) ||
            (s = polyak_save_fd(ema, fd)) != POLYAK_OK || write_all(fd, STATE_MAGIC, 8) || fsync(fd) != 0;
  if (fd >= 0 && close(fd) != 0)
    bad = 1;
  if (bad || rename(tmp, path) != 0) {
    fprintf(stderr, "trainer: saving %s failed: %s\n", path, s != POLYAK_OK ? polyak_last_error(ema) : strerror(errno));
    return -1;
  }
  return 0;
}

static int load_state(trainer *tr, polyak_t *ema, const char *path)
{
  char magic[8], end[8];
  size_t array_bytes = tr->params.num_params * sizeof(float);
  int fd = open(path, O_RDONLY);
  polyak_status s = POLYAK_OK;
  int bad = fd < 0 || read_all(fd, magic, 8) || memcmp(magic, STATE_MAGIC, 8) != 0 ||
            read_all(fd, &tr->step, sizeof tr->step) || read_all(fd, &tr->rng, sizeof tr->rng) ||
            read_all(fd, tr->params.memory, array_bytes) || read_all(fd, tr->m.memory, array_bytes) ||
            read_all(fd, tr->v.memory, array_bytes) || (s = polyak_load_fd(ema, fd)) != POLYAK_OK ||
            read_all(fd, end, 8) || memcmp(end, STATE_MAGIC, 8) != 0;
  if (fd >= 0)
    close(fd);
  if (bad) {
    fprintf(stderr, "trainer: resuming from %s failed: %s\n", path,
            s != POLYAK_OK ? polyak_last_error(ema) : "not a state file of this trainer");
    return -1;
  }
  return 0;
}

/* ---- the run ------------------------------------------------------------ */

static uint64_t digest(uint64_t hash, const void *data, size_t num_bytes) /* FNV-1a */
{
  const unsigned char *bytes = data;
  for (size_t i = 0; i < num_bytes; i++)
    hash = (hash ^ bytes[i]) * 0x100000001b3ULL;
  return hash;
}

static int fail(const char *what, polyak_t *ema, polyak_status s)
{
  fprintf(stderr, "trainer: %s: %s: %s\n", what, polyak_status_name(s), polyak_last_error(ema));
  return 1;
}

/* Two averages of the whole arena, warmed up (training starts from scratch). */
static polyak_status make_ema(polyak_t **ema, arena *params)
{
  polyak_config cfg;
  polyak_config_init(&cfg);
  cfg.num_shadows = 2;
  cfg.shadows[0].schedule.kind = POLYAK_SCHEDULE_WARMUP;
  cfg.shadows[0].schedule.beta = 0.999;
  cfg.shadows[1].schedule.kind = POLYAK_SCHEDULE_POWER;
  cfg.shadows[1].schedule.gamma = polyak_gamma_from_sigma_rel(0.10);
  polyak_status s = polyak_create(ema, &cfg);
  if (s != POLYAK_OK)
    return s;
  polyak_view views[NUM_TENSORS];
  for (int i = 0; i < NUM_TENSORS; i++)
    views[i] = (polyak_view){tensor_names[i], 2, {tensor_shapes[i][0], tensor_shapes[i][1]}};
  if ((s = polyak_add_arena(*ema, params->memory, POLYAK_F32, params->num_params, views, NUM_TENSORS)) == POLYAK_OK)
    s = polyak_finalize(*ema, NULL);
  return s;
}

/* Training from tr->step to `steps`, evaluating with each average every
 * 500 steps; stopped after `stop_after` (its state saved), else the digest.
 * The exit status. */
static int train(trainer *tr, polyak_t *ema, long steps, long stop_after, const char *state_path,
                 const unsigned char *train_text, const unsigned char *val_text)
{
  polyak_status s;
  printf("%-6s %10s %10s %12s %12s\n", "step", "train loss", "val raw", "val warmup", "val power");
  double train_loss = 0.0;
  while (tr->step < steps) {
    train_loss = train_step(tr, train_text);
    if ((s = polyak_update(ema, tr->step, NULL)) != POLYAK_OK)
      return fail("polyak_update", ema, s);
    if (tr->step % 500 == 0 || tr->step == steps) {
      double val[3] = {mean_loss(&tr->params, val_text, VAL_CHARS), 0, 0};
      for (int k = 0; k < 2; k++) { /* evaluate with average k, then the trained weights again */
        if ((s = polyak_store(ema, NULL)) || (s = polyak_copy_to_params(ema, k, NULL)))
          return fail("evaluating with an average", ema, s);
        val[k + 1] = mean_loss(&tr->params, val_text, VAL_CHARS);
        if ((s = polyak_restore(ema, NULL)) != POLYAK_OK)
          return fail("polyak_restore", ema, s);
      }
      printf("%-6lld %10.4f %10.4f %12.4f %12.4f\n", (long long)tr->step, train_loss, val[0], val[1], val[2]);
    }
    if (tr->step == stop_after) {
      int saved = save_state(tr, ema, state_path);
      printf("stopped after step %lld; state in %s\n", (long long)tr->step, state_path);
      return saved == 0 ? 0 : 1;
    }
  }
  uint64_t hash = digest(0xcbf29ce484222325ULL, tr->params.memory, tr->params.num_params * sizeof(float));
  for (int k = 0; k < 2; k++)
    for (int i = 0; i < NUM_TENSORS; i++) {
      float shadow[CTX * EMB * HIDDEN];
      if ((s = polyak_get_shadow_n(ema, k, i, shadow, POLYAK_F32, sizeof shadow, NULL)) != POLYAK_OK)
        return fail("polyak_get_shadow_n", ema, s);
      hash = digest(hash, shadow, (size_t)(tensor_shapes[i][0] * tensor_shapes[i][1]) * sizeof(float));
    }
  printf("digest of the params and both averages at step %lld: %016llx\n", (long long)tr->step,
         (unsigned long long)hash);
  return 0;
}

int main(int argc, char **argv)
{
  long steps = 3000, stop_after = -1;
  const char *state_path = "trainer.state", *resume = NULL;
  for (int a = 1; a < argc; a++) {
    if (strcmp(argv[a], "--steps") == 0 && a + 1 < argc)
      steps = atol(argv[++a]);
    else if (strcmp(argv[a], "--stop-after") == 0 && a + 1 < argc)
      stop_after = atol(argv[++a]);
    else if (strcmp(argv[a], "--state") == 0 && a + 1 < argc)
      state_path = argv[++a];
    else if (strcmp(argv[a], "--resume") == 0 && a + 1 < argc)
      resume = argv[++a];
    else {
      fprintf(stderr, "usage: %s [--steps N] [--stop-after M] [--state FILE] [--resume FILE]\n", argv[0]);
      return 2;
    }
  }
  static unsigned char train_text[TRAIN_CHARS], val_text[VAL_CHARS];
  make_text(train_text, TRAIN_CHARS, 1);
  make_text(val_text, VAL_CHARS, 2);

  trainer tr = {.step = 0, .rng = 42};
  arena_init(&tr.params), arena_init(&tr.grad), arena_init(&tr.m), arena_init(&tr.v);
  for (size_t i = 0; i < tr.params.num_params; i++) /* uniform, about 1/sqrt(fan-in) */
    tr.params.memory[i] = (float)(uniform(&tr.rng) - 0.5) * 0.3f;

  /* every way out of the run passes the one cleanup below */
  polyak_t *ema = NULL;
  polyak_status s = make_ema(&ema, &tr.params);
  int rc = 1;
  if (s != POLYAK_OK)
    fail("setting up the averages", ema, s);
  else if (!resume || load_state(&tr, ema, resume) == 0)
    rc = train(&tr, ema, steps, stop_after, state_path, train_text, val_text);
  polyak_destroy(ema);
  free(tr.params.memory), free(tr.grad.memory), free(tr.m.memory), free(tr.v.memory);
  return rc;
}
