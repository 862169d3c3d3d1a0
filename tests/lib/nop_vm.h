/* SPDX-License-Identifier: MIT */
/*
 * A VM that does nothing, for tests and fuzz targets that drive a real
 * session but never switch over: a session needs all four callbacks, and
 * these stop and start nothing and carry no device state.
 */
#ifndef VMIG_TEST_NOP_VM_H
#define VMIG_TEST_NOP_VM_H

#include <stddef.h>

#include <vmig/vmig.h>

static inline int nop_vm_run(void *opaque)
{
	(void)opaque;
	return 0;
}

static inline int nop_vm_save(void *opaque, void *buf, size_t cap, size_t *len)
{
	(void)opaque, (void)buf, (void)cap;
	*len = 0;
	return 0;
}

static inline int nop_vm_load(void *opaque, const void *buf, size_t len)
{
	(void)opaque, (void)buf, (void)len;
	return 0;
}

static const struct vmig_vm_ops nop_vm_ops = {
    .stop = nop_vm_run, .start = nop_vm_run, .save_state = nop_vm_save, .load_state = nop_vm_load};

#endif
