/*-------------------------------------------------------------------------
 *
 * inflater.c
 *	  The gunzip stepper on a thread of its own (see inflater.h).
 *
 * Two bounded buffers joined by one mutex and one condition variable
 * (broadcast on every change; there are only two parties): a queue of
 * compressed chunks going in, a ring of decompressed bytes coming out. The
 * thread blocks every signal, so PostgreSQL's handlers always run on the
 * backend's own thread, and touches nothing but this struct, zlib and libc.
 *
 *-------------------------------------------------------------------------
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "codec.h"
#include "inflater.h"

#define IN_SLOTS 8             /* compressed chunks queued */
#define OUT_SIZE (1024 * 1024) /* decompressed bytes buffered */

typedef struct InSlot
{
	size_t n;
	unsigned char data[INFLATER_CHUNK];
} InSlot;

struct Inflater
{
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t changed;

	/* under lock */
	InSlot in[IN_SLOTS];
	int in_head; /* the slot the thread reads */
	int in_count;
	bool in_ended;
	char out[OUT_SIZE];
	size_t out_head;
	size_t out_len;
	bool done; /* the thread has finished: result says how */
	InflaterStatus result;
	bool may_end;
	char msg[128];
	bool stop;

	/* the thread's alone */
	CodecGunzip gz;
	char step_buf[INFLATER_CHUNK];
};

/* Appends to the output ring, waiting for room; false if told to stop */
static bool
push_output(Inflater *inf, const char *src, size_t n)
{
	pthread_mutex_lock(&inf->lock);
	while (n > 0)
	{
		size_t tail, room;

		while (inf->out_len == OUT_SIZE && !inf->stop)
			pthread_cond_wait(&inf->changed, &inf->lock);
		if (inf->stop)
		{
			pthread_mutex_unlock(&inf->lock);
			return false;
		}
		tail = (inf->out_head + inf->out_len) % OUT_SIZE;
		room = OUT_SIZE - inf->out_len;
		if (room > OUT_SIZE - tail)
			room = OUT_SIZE - tail; /* up to the ring's end */
		if (room > n)
			room = n;
		memcpy(inf->out + tail, src, room);
		inf->out_len += room;
		src += room;
		n -= room;
		pthread_cond_broadcast(&inf->changed);
	}
	pthread_mutex_unlock(&inf->lock);
	return true;
}

static void *
inflater_main(void *arg)
{
	Inflater *inf = (Inflater *) arg;
	InflaterStatus result = INFLATER_END;
	const char *msg = NULL;

	for (;;)
	{
		InSlot *slot;

		pthread_mutex_lock(&inf->lock);
		while (inf->in_count == 0 && !inf->in_ended && !inf->stop)
			pthread_cond_wait(&inf->changed, &inf->lock);
		if (inf->stop || inf->in_count == 0)
		{
			pthread_mutex_unlock(&inf->lock);
			break; /* told to stop, or all input inflated */
		}
		slot = &inf->in[inf->in_head];
		pthread_mutex_unlock(&inf->lock);

		/* the slot stays queued (and its bytes valid) until consumed */
		if (codec_gunzip_feed(&inf->gz, slot->data, slot->n) != CODEC_GUNZIP_OK)
		{
			result = INFLATER_FAILED;
			msg = "could not initialize zlib";
			goto finish;
		}
		while (!codec_gunzip_needs_input(&inf->gz))
		{
			size_t produced;
			CodecGunzipStatus st =
				codec_gunzip_step(&inf->gz, inf->step_buf, sizeof(inf->step_buf), &produced, &msg);

			if (st == CODEC_GUNZIP_CORRUPT)
			{
				result = INFLATER_CORRUPT;
				goto finish;
			}
			if (st == CODEC_GUNZIP_RESET_FAILED || st == CODEC_GUNZIP_INIT_FAILED)
			{
				result = INFLATER_FAILED;
				msg = "could not reset zlib";
				goto finish;
			}
			if (produced > 0 && !push_output(inf, inf->step_buf, produced))
				goto finish;
		}

		pthread_mutex_lock(&inf->lock);
		inf->in_head = (inf->in_head + 1) % IN_SLOTS;
		inf->in_count--;
		pthread_cond_broadcast(&inf->changed);
		pthread_mutex_unlock(&inf->lock);
	}

finish:
	pthread_mutex_lock(&inf->lock);
	inf->done = true;
	inf->result = result;
	inf->may_end = codec_gunzip_may_end(&inf->gz);
	snprintf(inf->msg, sizeof(inf->msg), "%s", msg ? msg : "");
	pthread_cond_broadcast(&inf->changed);
	pthread_mutex_unlock(&inf->lock);
	return NULL;
}

Inflater *
inflater_start(void)
{
	Inflater *inf = calloc(1, sizeof(Inflater));
	pthread_condattr_t attr;
	sigset_t all, old;
	int rc;

	if (inf == NULL)
		return NULL;
	codec_gunzip_init(&inf->gz);
	pthread_mutex_init(&inf->lock, NULL);
	pthread_condattr_init(&attr);
	pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
	pthread_cond_init(&inf->changed, &attr);
	pthread_condattr_destroy(&attr);

	/* the thread inherits this mask: no signal is ever delivered to it */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	rc = pthread_create(&inf->thread, NULL, inflater_main, inf);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (rc != 0)
	{
		pthread_cond_destroy(&inf->changed);
		pthread_mutex_destroy(&inf->lock);
		free(inf);
		return NULL;
	}
#ifdef __linux__
	/* for top -H and perf; a failure only leaves the backend's name */
	(void) pthread_setname_np(inf->thread, "cd2sync gunzip");
#endif
	return inf;
}

bool
inflater_has_room(Inflater *inf)
{
	bool room;

	pthread_mutex_lock(&inf->lock);
	room = inf->in_count < IN_SLOTS && !inf->done; /* a finished thread takes no more */
	pthread_mutex_unlock(&inf->lock);
	return room;
}

void
inflater_put(Inflater *inf, const unsigned char *in, size_t n)
{
	pthread_mutex_lock(&inf->lock);
	while (inf->in_count == IN_SLOTS && !inf->done)
		pthread_cond_wait(&inf->changed, &inf->lock);
	if (!inf->done) /* a finished thread takes no more: its result stands */
	{
		InSlot *slot = &inf->in[(inf->in_head + inf->in_count) % IN_SLOTS];

		if (n > INFLATER_CHUNK)
			n = INFLATER_CHUNK;
		memcpy(slot->data, in, n);
		slot->n = n;
		inf->in_count++;
		pthread_cond_broadcast(&inf->changed);
	}
	pthread_mutex_unlock(&inf->lock);
}

/* Sets one of the flags under lock, and wakes the other side */
static void
raise_flag(Inflater *inf, bool *flag)
{
	pthread_mutex_lock(&inf->lock);
	*flag = true;
	pthread_cond_broadcast(&inf->changed);
	pthread_mutex_unlock(&inf->lock);
}

void
inflater_end_input(Inflater *inf)
{
	raise_flag(inf, &inf->in_ended);
}

InflaterStatus
inflater_take(Inflater *inf, char *dst, size_t len, size_t *got, int wait_ms, bool *may_end,
			  const char **msg)
{
	InflaterStatus status;

	*got = 0;
	pthread_mutex_lock(&inf->lock);
	if (inf->out_len == 0 && !inf->done && wait_ms > 0)
	{
		struct timespec until;

		clock_gettime(CLOCK_MONOTONIC, &until);
		until.tv_sec += wait_ms / 1000;
		until.tv_nsec += (long) (wait_ms % 1000) * 1000000L;
		if (until.tv_nsec >= 1000000000L)
		{
			until.tv_sec++;
			until.tv_nsec -= 1000000000L;
		}
		while (inf->out_len == 0 && !inf->done)
		{
			if (pthread_cond_timedwait(&inf->changed, &inf->lock, &until) == ETIMEDOUT)
				break;
		}
	}
	if (inf->out_len > 0)
	{
		/* what is buffered is taken even after the thread has finished */
		while (*got < len && inf->out_len > 0)
		{
			size_t n = inf->out_len;

			if (n > OUT_SIZE - inf->out_head)
				n = OUT_SIZE - inf->out_head;
			if (n > len - *got)
				n = len - *got;
			memcpy(dst + *got, inf->out + inf->out_head, n);
			inf->out_head = (inf->out_head + n) % OUT_SIZE;
			inf->out_len -= n;
			*got += n;
		}
		pthread_cond_broadcast(&inf->changed);
		status = INFLATER_DATA;
	}
	else if (inf->done)
	{
		status = inf->result;
		*may_end = inf->may_end;
		*msg = inf->msg;
	}
	else
		status = INFLATER_EMPTY;
	pthread_mutex_unlock(&inf->lock);
	return status;
}

void
inflater_stop(Inflater *inf)
{
	raise_flag(inf, &inf->stop);
	pthread_join(inf->thread, NULL);
	codec_gunzip_end(&inf->gz);
	pthread_cond_destroy(&inf->changed);
	pthread_mutex_destroy(&inf->lock);
	free(inf);
}
