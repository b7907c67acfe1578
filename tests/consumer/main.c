/* A program that knows polyak only through its installed header and
 * library: it averages two steps of a tiny tensor and checks the result. */
#include <math.h>
#include <stdio.h>

#include <polyak.h>

int main(void)
{
  float param[3] = {1.0f, 2.0f, 3.0f};
  float shadow[3];
  int64_t shape[1] = {3};
  polyak_config cfg;
  polyak_config_init(&cfg);
  cfg.shadows[0].schedule.beta = 0.5;
  polyak_t *p = NULL;
  if (polyak_create(&p, &cfg) != POLYAK_OK || polyak_add(p, "w", param, POLYAK_F32, 1, shape) ||
      polyak_finalize(p, NULL)) {
    fprintf(stderr, "consumer: setup failed: %s\n", polyak_last_error(p));
    return 1;
  }
  param[0] = 3.0f;
  if (polyak_update(p, 1, NULL) || polyak_get_shadow(p, 0, 0, shadow, POLYAK_F32, NULL)) {
    fprintf(stderr, "consumer: %s\n", polyak_last_error(p));
    return 1;
  }
  polyak_destroy(p);
  if (shadow[0] != 2.0f || shadow[1] != 2.0f) {
    fprintf(stderr, "consumer: shadow %g %g, expected 2 2\n", shadow[0], shadow[1]);
    return 1;
  }
  printf("consumer: polyak %s linked and averaged correctly\n", polyak_version_string());
  return 0;
}
