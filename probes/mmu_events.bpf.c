/*
 * mmu_events.bpf.c: every kvmmmu event, the MMU's kvm events and the KVM ioctls, as fixed-size
 * records in two BPF ring buffers (events: full records; small_events: records of SMALL_SLOTS
 * slots, for the events that need no more, the hottest ones).
 *
 * Compiled by bcc at start-up (probes/loader.py).  The loader prepends:
 *   OFF_<struct>__<member>[__<member>] / SZ_...   kernel struct layout, from the running kernel's
 *                                                 BTF (never from headers: they may be another
 *                                                 release's)
 *   EV_<event>                                    index of the event in mmutrace.schema.EVENTS
 *   WANT_<event>                                  1 for the events asked for, else 0
 *   SMALL_<event>                                 1: its slots fit a small record (probes/layout.py)
 *   FILTER                                        1: only targeted processes and their VMs
 *   NR_EVENTS, RINGBUF_PAGES, NR_SLOTS, SMALL_SLOTS
 *
 * Raw tracepoints get the TP_PROTO arguments (kernel structs) instead of the formatted record: they
 * are cheaper, and the structs hold the inputs the printed fields lack (the fault's address, error
 * code, memslot and levels; the shadow page's address; the VM's MMU page counters).  What each
 * slot f[i] of a record holds is listed per event in probes/layout.py (SLOTS), in the order the
 * probes below fill them.  kvm_exit is the one formatted tracepoint: its exit reason and info come
 * from a vendor callback (kvm_pvm here) that a raw tracepoint cannot call.
 */

typedef u64 gpa_t;
typedef u64 gfn_t;

struct mmu_record {
	u64 ts_ns;
	u64 vm;         /* struct kvm *, 0 = unknown */
	u32 seq;        /* per-CPU; a gap is a lost record */
	s32 pid;        /* tgid */
	s32 tid;
	s32 vcpu;       /* vcpu_id, -1 = not on a vCPU thread */
	u16 cpu;
	u16 event;      /* EV_* */
	u32 nulls;      /* bit i set: f[i] is null */
	u64 f[NR_SLOTS];
};

/*
 * What learn_vcpu() learnt about a thread: later events on it belong to this VM and vCPU.  The
 * filter's verdict is cached here too.  @tgid guards against a reused tid.
 */
struct vcpu_ctx {
	u64 kvm;
	u64 vcpu;               /* struct kvm_vcpu * */
	s32 vcpu_id;
	u32 tgid;
	u8 recorded;
};

/*
 * Per-CPU counters, and the vcpu_ctx of the thread that last recorded on this CPU: a vCPU thread
 * faulting makes ~10 events in a row on one CPU, so the hot path is two array lookups (inlined by
 * the verifier) and no hash lookup.  The copy is valid while the thread (@ctx_pid_tgid) and
 * vcpu_gen are the same.  Probes run with preemption disabled (tracepoint callbacks), so one
 * CPU's copy is never written by two programs at once.
 */
struct cpu_stats {
	u32 seq;                /* next record's seq */
	u64 lost;               /* ring buffer full */
	u64 hits[NR_EVENTS];    /* probe hits of recorded processes, per event */
	u64 ctx_pid_tgid;       /* 0: no copy */
	u64 ctx_gen;
	struct vcpu_ctx ctx;
};

/* A KVM ioctl between sys_enter and sys_exit. */
struct pending_ioctl {
	u64 vm;
	u32 cmd;
	s32 vcpu;
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
/*
 * Records of only SMALL_SLOTS slots: 56 bytes, 64 with the ring's header, one cache line (the ring
 * data is page-aligned and every record in it is 64 bytes).  Most events (the guest walk's
 * pagetable_walk, paging_element and A/D bits: ~80% on a fault-heavy guest) need no more, and half
 * the bytes is half of what the probe writes and the recorder copies.
 */
BPF_RINGBUF_OUTPUT(small_events, RINGBUF_PAGES);
#define SMALL_RECORD_SIZE (sizeof(struct mmu_record) - 8 * (NR_SLOTS - SMALL_SLOTS))
BPF_PERCPU_ARRAY(stats, struct cpu_stats, 1);
BPF_HASH(targets, u32, u8, 1024);               /* tgids recorded (FILTER) */
BPF_HASH(vms, u64, u8, 256);                    /* struct kvm * of VMs owned by targets */
BPF_HASH(vcpu_of_tid, u32, struct vcpu_ctx, 16384);
BPF_ARRAY(vcpu_gen, u64, 1);                    /* bumped at every vcpu_of_tid update */
BPF_HASH(vm_of_tgid, u32, u64, 1024);
BPF_HASH(ioctls, u32, struct pending_ioctl, 1024);
BPF_PERCPU_ARRAY(bitmap_scratch, struct mmu_record, 1);	/* record_clear_bitmap's row */
BPF_ARRAY(direct_map, u64, 1);                  /* PAGE_OFFSET once learnt, else 0 */
BPF_HASH(root_spt, u32, u64, 4096);             /* per thread: spt of the last root it got */

#define F(p, path) rd((u64)(p), OFF_##path, SZ_##path)
#define PACK2(lo, hi) (((u64)(u32)(lo)) | ((u64)(hi) << 32))

/* A little-endian read of one kernel struct member; 0 when the pointer is bad. */
static __always_inline u64 rd(u64 base, u32 off, u32 size)
{
	u64 v = 0;
	bpf_probe_read_kernel(&v, size, (void *)(base + off));
	return v;
}

/*
 * One read of every member of @type the probes name, instead of one read per member: the loader
 * defines the span (SPAN_LO_/SPAN_SIZE_<type>, from BTF) and each member's offset in it; S() then
 * takes a member from the copy.  A span that would not fit the BPF stack is refused at compile time.
 */
#define SPAN_READ(buf, base, type)                                                        \
	u64 buf[SPAN_SIZE_##type / 8];                                                    \
	_Static_assert(SPAN_SIZE_##type <= 128, "members of " #type " spread too far");   \
	bpf_probe_read_kernel(buf, SPAN_SIZE_##type, (void *)((base) + SPAN_LO_##type))
#define S(buf, path) span_get(buf, SPAN_OFF_##path, SZ_##path)

static __always_inline u64 span_get(const u64 *buf, u32 off, u32 size)
{
	const u8 *p = (const u8 *)buf + off;

	if (size == 1)
		return *p;
	if (size == 2)
		return *(const u16 *)p;
	if (size == 4)
		return *(const u32 *)p;
	return *(const u64 *)p;
}

static __always_inline u64 rd_user(u64 addr, u32 size)
{
	u64 v = 0;
	bpf_probe_read_user(&v, size, (void *)addr);
	return v;
}

static __always_inline u64 mmu_pages(u64 kvm)
{
	SPAN_READ(k, kvm, kvm);
	return PACK2(S(k, kvm__arch__n_used_mmu_pages), S(k, kvm__arch__n_max_mmu_pages));
}

/* The filter: a targeted process (or its child), or a VM one of them owns. */
static __always_inline bool is_recorded(u32 tgid, u64 kvm)
{
#if FILTER
	return targets.lookup(&tgid) || (kvm && vms.lookup(&kvm));
#else
	return true;
#endif
}

/*
 * Start a record of @event, or return NULL when the event is filtered out or the ring is full
 * (counted in lost).  @kvm/@vcpu_id: the event's own VM and vCPU when its arguments name them,
 * else 0/-1 and they are taken from what learn_vcpu() learnt about the current thread.  @small
 * (a constant): a small record, whose f[] ends at SMALL_SLOTS, from small_events.
 */
static __always_inline struct mmu_record *record_begin(u32 event, u64 kvm, s32 vcpu_id, bool small)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();
	u32 tgid = pid_tgid >> 32, tid = (u32)pid_tgid, zero = 0;
	struct cpu_stats *st = stats.lookup(&zero);
	u64 *gen = vcpu_gen.lookup(&zero);
	bool recorded;

	if (!st || !gen || event >= NR_EVENTS)
		return NULL;
	if (st->ctx_pid_tgid != pid_tgid || st->ctx_gen != *gen) {
		struct vcpu_ctx *known = vcpu_of_tid.lookup(&tid);

		st->ctx_pid_tgid = 0;
		if (known && known->tgid == tgid) {
			st->ctx = *known;
			st->ctx_gen = *gen;
			st->ctx_pid_tgid = pid_tgid;
		}
	}
	if (st->ctx_pid_tgid) {
		if (!kvm) {
			kvm = st->ctx.kvm;
			vcpu_id = st->ctx.vcpu_id;
		}
		recorded = st->ctx.recorded;
	} else {
		if (!kvm) {
			u64 *owned = vm_of_tgid.lookup(&tgid);
			if (owned)
				kvm = *owned;
		}
		recorded = is_recorded(tgid, kvm);
	}
	if (!recorded)
		return NULL;
	st->hits[event]++;
	u32 n = st->seq++;
	struct mmu_record *r;
	if (small)
		r = small_events.ringbuf_reserve(SMALL_RECORD_SIZE);
	else
		r = events.ringbuf_reserve(sizeof(struct mmu_record));
	if (!r) {
		st->lost++;
		return NULL;
	}
	r->ts_ns = bpf_ktime_get_ns();
	r->vm = kvm;
	r->seq = n;
	r->pid = tgid;
	r->tid = tid;
	r->vcpu = vcpu_id;
	r->cpu = bpf_get_smp_processor_id();
	r->event = event;
	r->nulls = 0;
	return r;
}

/* No wake-up per record: the consumer polls, which is far cheaper at a million events a second. */
static __always_inline void record_end(struct mmu_record *r)
{
	events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);	/* either ring's: a record knows its ring */
}

#define BEGIN_IN(event, kvm, vcpu_id, small)                                    \
	struct mmu_record *r = record_begin((event), (kvm), (vcpu_id), (small)); \
	if (!r)                                                                 \
		return 0
/* @event known only at run time: a full record. */
#define BEGIN_ID(event, kvm, vcpu_id) BEGIN_IN(event, kvm, vcpu_id, 0)
#define BEGIN(ev, kvm, vcpu_id) BEGIN_IN(EV_##ev, kvm, vcpu_id, SMALL_##ev)

/*
 * Events whose TP_PROTO arguments are the printed fields, all unsigned (or never negative): f[i] is
 * argument i.  Raw tracepoint arguments arrive zero-extended to u64 (__CAST_TO_U64), so a signed
 * argument that can be negative needs its own probe that sign-extends it.
 */
#define ARGS_PROBE(ev, nr_args)                                  \
	RAW_TRACEPOINT_PROBE(ev)                                 \
	{                                                        \
		BEGIN(ev, 0, -1);                                \
		_Pragma("unroll")                                \
		for (int i = 0; i < (nr_args); i++)              \
			r->f[i] = ctx->args[i];                  \
		record_end(r);                                   \
		return 0;                                        \
	}

#if WANT_kvm_mmu_pagetable_walk
ARGS_PROBE(kvm_mmu_pagetable_walk, 2)		/* (u64 addr, u32 pferr) */
#endif
#if WANT_kvm_mmu_paging_element
ARGS_PROBE(kvm_mmu_paging_element, 2)		/* (u64 pte, int level) */
#endif
#if WANT_kvm_mmu_walker_error
ARGS_PROBE(kvm_mmu_walker_error, 1)		/* (u32 pferr) */
#endif
#if WANT_kvm_tdp_mmu_spte_changed
ARGS_PROBE(kvm_tdp_mmu_spte_changed, 5)	/* (int as_id, gfn_t, int level, u64 old, u64 new) */
#endif
#if WANT_handle_mmio_page_fault
ARGS_PROBE(handle_mmio_page_fault, 3)		/* (u64 addr, gfn_t gfn, unsigned access) */
#endif
#if WANT_check_mmio_spte
ARGS_PROBE(check_mmio_spte, 3)			/* (u64 spte, unsigned kvm_gen, unsigned spte_gen) */
#endif
#if WANT_kvm_unmap_hva_range
ARGS_PROBE(kvm_unmap_hva_range, 2)		/* (unsigned long start, unsigned long end) */
#endif
#if WANT_kvm_age_hva
ARGS_PROBE(kvm_age_hva, 2)			/* (unsigned long start, unsigned long end) */
#endif
#if WANT_kvm_test_age_hva
ARGS_PROBE(kvm_test_age_hva, 1)		/* (unsigned long hva) */
#endif

/* ---- kvmmmu: guest page-table walker (paging_tmpl.h) ---- */

/* (unsigned long table_gfn, unsigned index, unsigned size): gpa as the tracepoint prints it. */
#define AD_BIT_PROBE(ev)                                                                  \
	RAW_TRACEPOINT_PROBE(ev)                                                          \
	{                                                                                 \
		BEGIN(ev, 0, -1);                                                         \
		r->f[0] = (ctx->args[0] << 12) + (u32)ctx->args[1] * (u32)ctx->args[2];   \
		record_end(r);                                                            \
		return 0;                                                                 \
	}
#if WANT_kvm_mmu_set_accessed_bit
AD_BIT_PROBE(kvm_mmu_set_accessed_bit)
#endif
#if WANT_kvm_mmu_set_dirty_bit
AD_BIT_PROBE(kvm_mmu_set_dirty_bit)
#endif

/* ---- kvmmmu: shadow pages (struct kvm_mmu_page *) ---- */

/* KVM_MMU_PAGE_FIELDS of mmutrace.h, plus the page's address (its identity while it lives). */
static __always_inline void mmu_page_fields(struct mmu_record *r, u64 sp)
{
	SPAN_READ(page, sp, kvm_mmu_page);
	r->f[0] = S(page, kvm_mmu_page__mmu_valid_gen);
	r->f[1] = S(page, kvm_mmu_page__gfn);
	r->f[2] = S(page, kvm_mmu_page__role);
	r->f[3] = S(page, kvm_mmu_page__root_count);
	r->f[4] = S(page, kvm_mmu_page__unsync);
	r->f[5] = sp;
}

/* The VM's page counters; null when the thread's VM is unknown (not a vCPU thread). */
static __always_inline void mmu_pages_slot(struct mmu_record *r, int slot)
{
	if (r->vm)
		r->f[slot] = mmu_pages(r->vm);
	else
		r->nulls |= 1 << slot;
}

/*
 * kvm_mmu_set_spte prints virt_to_phys(sptep), and this kernel's kallsyms has no data symbols
 * (page_offset_base), so the direct-map base is learnt from KVM itself: a vCPU thread gets its
 * shadow root (a get_page of level >= 4; sp->spt is its table's kernel address) and then, on
 * its next get_page, vcpu->arch.mmu->root.hpa is that table's physical address.  The difference
 * is accepted only when PUD-aligned, as the (randomized) direct-map base always is, which
 * rejects a pairing with another root.
 */
#define PUD_SIZE (1ULL << 30)
#define INVALID_PAGE (~0ULL)

static __always_inline void learn_direct_map(u64 sp)
{
	u32 tid = (u32)bpf_get_current_pid_tgid(), zero = 0;
	u64 *base = direct_map.lookup(&zero), spt;

	if (!base || *base)
		return;	/* learnt (or no map): no kernel read for the rest of the recording */
	spt = F(sp, kvm_mmu_page__spt);
	if ((F(sp, kvm_mmu_page__role) & 0xf) >= 4) {
		root_spt.update(&tid, &spt);
		return;
	}
	struct vcpu_ctx *ctx = vcpu_of_tid.lookup(&tid);
	u64 *root = root_spt.lookup(&tid);
	if (!ctx || !root)
		return;
	u64 hpa = F(F(ctx->vcpu, kvm_vcpu__arch__mmu), kvm_mmu__root__hpa);
	if (hpa != INVALID_PAGE && hpa && !((*root - hpa) & (PUD_SIZE - 1)))
		*base = *root - hpa;
}

#if WANT_kvm_mmu_get_page || WANT_kvm_mmu_set_spte
RAW_TRACEPOINT_PROBE(kvm_mmu_get_page)	/* (struct kvm_mmu_page *sp, bool created) */
{
	learn_direct_map(ctx->args[0]);
#if WANT_kvm_mmu_get_page
	BEGIN(kvm_mmu_get_page, 0, -1);
	mmu_page_fields(r, ctx->args[0]);
	r->f[6] = (u8)ctx->args[1];
	mmu_pages_slot(r, 7);
	record_end(r);
#endif
	return 0;
}
#endif

#define MMU_PAGE_PROBE(ev)                              \
	RAW_TRACEPOINT_PROBE(ev)                        \
	{                                               \
		BEGIN(ev, 0, -1);                       \
		mmu_page_fields(r, ctx->args[0]);       \
		record_end(r);                          \
		return 0;                               \
	}
#if WANT_kvm_mmu_sync_page
MMU_PAGE_PROBE(kvm_mmu_sync_page)
#endif
#if WANT_kvm_mmu_unsync_page
MMU_PAGE_PROBE(kvm_mmu_unsync_page)
#endif

#if WANT_kvm_mmu_prepare_zap_page
RAW_TRACEPOINT_PROBE(kvm_mmu_prepare_zap_page)	/* (struct kvm_mmu_page *sp) */
{
	BEGIN(kvm_mmu_prepare_zap_page, 0, -1);
	mmu_page_fields(r, ctx->args[0]);
	mmu_pages_slot(r, 6);
	record_end(r);
	return 0;
}
#endif

#if WANT_kvm_mmu_zap_all_fast
RAW_TRACEPOINT_PROBE(kvm_mmu_zap_all_fast)	/* (struct kvm *kvm) */
{
	u64 kvm = ctx->args[0];
	BEGIN(kvm_mmu_zap_all_fast, kvm, -1);
	r->f[0] = F(kvm, kvm__arch__mmu_valid_gen);
	r->f[1] = mmu_pages(kvm);
	record_end(r);
	return 0;
}
#endif

/* ---- kvmmmu: SPTEs ---- */

#if WANT_kvm_mmu_spte_requested
RAW_TRACEPOINT_PROBE(kvm_mmu_spte_requested)	/* (struct kvm_page_fault *fault) */
{
	BEGIN(kvm_mmu_spte_requested, 0, -1);
	SPAN_READ(pf, ctx->args[0], kvm_page_fault);
	u64 gfn = S(pf, kvm_page_fault__gfn);
	u64 goal_level = S(pf, kvm_page_fault__goal_level);
	/* The tracepoint's pfn: the 4K frame of gfn inside a huge mapping. */
	u64 huge_mask = (1ULL << (((goal_level - 1) & 3) * 9)) - 1;
	u64 slot = S(pf, kvm_page_fault__slot);

	r->f[0] = gfn;
	r->f[1] = S(pf, kvm_page_fault__pfn) | (gfn & huge_mask);
	r->f[2] = S(pf, kvm_page_fault__addr);
	r->f[3] = S(pf, kvm_page_fault__error_code);
	r->f[4] = goal_level | S(pf, kvm_page_fault__max_level) << 8 |
		  S(pf, kvm_page_fault__req_level) << 16 |
		  S(pf, kvm_page_fault__map_writable) << 24 |
		  S(pf, kvm_page_fault__prefetch) << 25;
	if (slot) {
		SPAN_READ(ms, slot, kvm_memory_slot);
		r->f[5] = PACK2(S(ms, kvm_memory_slot__flags), S(ms, kvm_memory_slot__id));
		r->f[6] = S(ms, kvm_memory_slot__base_gfn);
		r->f[7] = S(ms, kvm_memory_slot__npages);
		r->f[8] = S(ms, kvm_memory_slot__userspace_addr);
	} else {
		r->nulls |= 0xf << 5;	/* no memslot: MMIO or a private fault */
	}
	mmu_pages_slot(r, 9);
	record_end(r);
	return 0;
}
#endif

#if WANT_kvm_mmu_set_spte
RAW_TRACEPOINT_PROBE(kvm_mmu_set_spte)	/* (int level, gfn_t gfn, u64 *sptep) */
{
	BEGIN(kvm_mmu_set_spte, 0, -1);
	u32 zero = 0;
	u64 *base = direct_map.lookup(&zero);	/* after the filter: only for recorded events */
	r->f[0] = ctx->args[1];
	r->f[1] = rd(ctx->args[2], 0, 8);
	if (base && *base)
		r->f[2] = ctx->args[2] - *base;	/* virt_to_phys(), as the tracepoint prints it */
	else
		r->nulls |= 1 << 2;
	r->f[3] = (u32)ctx->args[0];
	record_end(r);
	return 0;
}
#endif

#if WANT_kvm_mmu_split_huge_page
RAW_TRACEPOINT_PROBE(kvm_mmu_split_huge_page)	/* (u64 gfn, u64 spte, int level, int errno) */
{
	BEGIN(kvm_mmu_split_huge_page, 0, -1);
	r->f[0] = ctx->args[0];
	r->f[1] = ctx->args[1];
	r->f[2] = (u32)ctx->args[2];
	r->f[3] = (s64)(int)ctx->args[3];
	record_end(r);
	return 0;
}
#endif

#if WANT_fast_page_fault
/* (struct kvm_vcpu *, struct kvm_page_fault *, u64 *sptep, u64 old_spte, int ret) */
RAW_TRACEPOINT_PROBE(fast_page_fault)
{
	u64 vcpu = ctx->args[0], fault = ctx->args[1], sptep = ctx->args[2];
	BEGIN(fast_page_fault, F(vcpu, kvm_vcpu__kvm), F(vcpu, kvm_vcpu__vcpu_id));
	r->f[0] = F(fault, kvm_page_fault__addr);
	r->f[1] = F(fault, kvm_page_fault__error_code);
	r->f[2] = sptep;
	r->f[3] = ctx->args[3];
	r->f[4] = rd(sptep, 0, 8);	/* the tracepoint re-reads *sptep too */
	r->f[5] = (s64)(int)ctx->args[4];
	record_end(r);
	return 0;
}
#endif

/* ---- kvmmmu: MMIO SPTEs (mmio_caching=N hosts never fire these) ---- */

#if WANT_mark_mmio_spte
RAW_TRACEPOINT_PROBE(mark_mmio_spte)	/* (u64 *sptep, gfn_t gfn, u64 spte) */
{
	u64 spte = ctx->args[2];
	BEGIN(mark_mmio_spte, 0, -1);
	r->f[0] = ctx->args[0];
	r->f[1] = ctx->args[1];
	r->f[2] = spte & 7;	/* ACC_ALL */
	/* get_mmio_spte_generation(): gen bits 0-7 in SPTE bits 3-10, bits 8-18 in SPTE bits 52-62 */
	r->f[3] = ((spte >> 3) & 0xff) | (((spte >> 52) & 0x7ff) << 8);
	record_end(r);
	return 0;
}
#endif

/* ---- kvm: vCPU events ---- */

#define VCPU_REGS_RIP 16
#define vcpu_rip(vcpu) rd((vcpu), OFF_kvm_vcpu__arch__regs + VCPU_REGS_RIP * 8, 8)

#if WANT_kvm_page_fault
RAW_TRACEPOINT_PROBE(kvm_page_fault)	/* (struct kvm_vcpu *, u64 fault_address, u64 error_code) */
{
	u64 vcpu = ctx->args[0];
	BEGIN(kvm_page_fault, F(vcpu, kvm_vcpu__kvm), F(vcpu, kvm_vcpu__vcpu_id));
	r->f[0] = vcpu_rip(vcpu);
	r->f[1] = ctx->args[1];
	r->f[2] = ctx->args[2];
	record_end(r);
	return 0;
}
#endif

/*
 * What a vCPU thread runs: later events on the thread belong to this VM and vCPU, and events on
 * other threads of the process to this VM.  Learnt at KVM_RUN (every backend) and at kvm_entry
 * (which the PVM backend does not emit).
 */
/*
 * Keep vms[] to the VMs of targeted processes.  A struct kvm freed when its VM exits can be
 * reallocated for another process's VM: the first sign of that VM in another process removes it.
 */
static __always_inline void own_vm(u32 tgid, u64 kvm)
{
	u8 one = 1;

	if (targets.lookup(&tgid))
		vms.update(&kvm, &one);
	else
		vms.delete(&kvm);
}

static __always_inline void learn_vcpu(u64 vcpu, u64 kvm, s32 vcpu_id)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();
	u32 tgid = pid_tgid >> 32, tid = (u32)pid_tgid;
	struct vcpu_ctx *known = vcpu_of_tid.lookup(&tid);

	if (known && known->vcpu == vcpu && known->tgid == tgid)
		return;
	own_vm(tgid, kvm);
	struct vcpu_ctx c = {.kvm = kvm, .vcpu = vcpu, .vcpu_id = vcpu_id, .tgid = tgid,
			     .recorded = is_recorded(tgid, kvm)};
	u32 zero = 0;
	u64 *gen = vcpu_gen.lookup(&zero);
	vcpu_of_tid.update(&tid, &c);
	vm_of_tgid.update(&tgid, &kvm);
	if (gen)
		__sync_fetch_and_add(gen, 1);	/* every CPU's copy of a vcpu_ctx is stale now */
}

RAW_TRACEPOINT_PROBE(kvm_entry)	/* (struct kvm_vcpu *, bool force_immediate_exit) */
{
	u64 vcpu = ctx->args[0], kvm = F(vcpu, kvm_vcpu__kvm);
	s32 vcpu_id = F(vcpu, kvm_vcpu__vcpu_id);

	learn_vcpu(vcpu, kvm, vcpu_id);
#if WANT_kvm_entry
	BEGIN(kvm_entry, kvm, vcpu_id);
	r->f[0] = vcpu_rip(vcpu);
	r->f[1] = mmu_pages(kvm);
	record_end(r);
#endif
	return 0;
}

#if WANT_kvm_exit
TRACEPOINT_PROBE(kvm, kvm_exit)
{
	BEGIN(kvm_exit, 0, args->vcpu_id);
	r->f[0] = args->exit_reason;
	r->f[1] = args->guest_rip;
	r->f[2] = args->info1;
	r->f[3] = args->info2;
	r->f[4] = args->error_code;
	record_end(r);
	return 0;
}
#endif

/* ---- kvm: emulated I/O ---- */

/* The first @len bytes at @val, as the tracepoints copy them (0 when there is no buffer). */
static __always_inline u64 io_value(u64 val, u32 len)
{
	u64 v = val ? rd(val, 0, 8) : 0;
	return len >= 8 ? v : v & ((1ULL << (len * 8)) - 1);
}

#if WANT_kvm_mmio
RAW_TRACEPOINT_PROBE(kvm_mmio)	/* (int type, int len, u64 gpa, void *val) */
{
	u32 len = (u32)ctx->args[1];
	BEGIN(kvm_mmio, 0, -1);
	r->f[0] = (u32)ctx->args[0];
	r->f[1] = len;
	r->f[2] = ctx->args[2];
	r->f[3] = io_value(ctx->args[3], len);
	record_end(r);
	return 0;
}
#endif

#if WANT_kvm_pio
RAW_TRACEPOINT_PROBE(kvm_pio)	/* (unsigned rw, unsigned port, unsigned size, unsigned count, void *data) */
{
	u32 size = (u32)ctx->args[2];
	BEGIN(kvm_pio, 0, -1);
	r->f[0] = (u32)ctx->args[0];
	r->f[1] = (u32)ctx->args[1];
	r->f[2] = size;
	r->f[3] = (u32)ctx->args[3];
	r->f[4] = io_value(ctx->args[4], size & 7);
	record_end(r);
	return 0;
}
#endif

#if WANT_kvm_userspace_exit
RAW_TRACEPOINT_PROBE(kvm_userspace_exit)	/* (__u32 reason, int errno) */
{
	BEGIN(kvm_userspace_exit, 0, -1);
	r->f[0] = (u32)ctx->args[0];
	r->f[1] = (s64)(int)ctx->args[1];
	record_end(r);
	return 0;
}
#endif

/* ---- KVM ioctls (syscall tracepoints; argument structs are read from user memory) ---- */
/* sys_enter_ioctl is always attached: KVM_RUN tells which VM and vCPU a thread runs. */

#define KVMIO 0xAE
#define KVM_RUN 0xAE80
#define KVM_CREATE_VM 0xAE01
#define KVM_CREATE_VCPU 0xAE41
#define KVM_SET_NR_MMU_PAGES 0xAE44
#define KVM_GET_DIRTY_LOG 0x4010AE42
#define KVM_SET_USER_MEMORY_REGION 0x4020AE46
#define KVM_SET_USER_MEMORY_REGION2 0x40A0AE49
#define KVM_SET_SREGS 0x4138AE84
#define KVM_CLEAR_DIRTY_LOG 0xC018AEC0
#define KVM_ENABLE_CAP 0x4068AEA3
/* KVM_CLEAR_DIRTY_LOG's mask is read 64 pages at a time, at most this many words (64 MiB of guest). */
#define MAX_BITMAP_WORDS 256
/* struct kvm_sregs (uapi): 8 kvm_segment (24 bytes) + gdt, idt (16 bytes) then the CRs. */
#define SREGS_CR0 224
#define SREGS_CR3 240
#define SREGS_CR4 248
#define SREGS_EFER 264

/* The caller's struct file of @fd, 0 when there is none. */
static __always_inline u64 fd_file(u64 fd)
{
	u64 task = bpf_get_current_task();
	u64 fdt = F(F(task, task_struct__files), files_struct__fdt);

	if (fd >= F(fdt, fdtable__max_fds))
		return 0;
	return rd(F(fdt, fdtable__fd), fd * 8, 8);
}

/* @file->private_data: the struct kvm of a VM fd, the kvm_vcpu of a vCPU fd; 0 without a file. */
static __always_inline u64 file_private_data(u64 file)
{
	return file ? F(file, file__private_data) : 0;
}

static __always_inline u32 ioctl_event(u32 cmd)
{
	switch (cmd) {
	case KVM_SET_USER_MEMORY_REGION:
	case KVM_SET_USER_MEMORY_REGION2:
		return WANT_ioctl_set_user_memory_region ? EV_ioctl_set_user_memory_region : NR_EVENTS;
	case KVM_SET_NR_MMU_PAGES:
		return WANT_ioctl_set_nr_mmu_pages ? EV_ioctl_set_nr_mmu_pages : NR_EVENTS;
	case KVM_SET_SREGS:
		return WANT_ioctl_set_sregs ? EV_ioctl_set_sregs : NR_EVENTS;
	case KVM_GET_DIRTY_LOG:
		return WANT_ioctl_get_dirty_log ? EV_ioctl_get_dirty_log : NR_EVENTS;
	case KVM_CLEAR_DIRTY_LOG:
		return WANT_ioctl_clear_dirty_log ? EV_ioctl_clear_dirty_log : NR_EVENTS;
	case KVM_ENABLE_CAP:
		return WANT_ioctl_enable_cap ? EV_ioctl_enable_cap : NR_EVENTS;
	case KVM_CREATE_VM:
		return WANT_ioctl_create_vm ? EV_ioctl_create_vm : NR_EVENTS;
	case KVM_CREATE_VCPU:
		return WANT_ioctl_create_vcpu ? EV_ioctl_create_vcpu : NR_EVENTS;
	}
	return NR_EVENTS;
}

/* Is @file a VM fd?  KVM_ENABLE_CAP has one number for VM and vCPU fds; their anon inodes are named
 * "kvm-vm" and "kvm-vcpu:N". */
static __always_inline bool is_vm_file(u64 file)
{
	u64 name = F(F(file, file__f_path__dentry), dentry__d_name__name);
	char buf[8] = {};

	bpf_probe_read_kernel(buf, 7, (void *)name);
	return buf[0] == 'k' && buf[1] == 'v' && buf[2] == 'm' && buf[3] == '-' && buf[4] == 'v' &&
	       buf[5] == 'm' && buf[6] == 0;
}

/*
 * KVM_CLEAR_DIRTY_LOG's mask in user memory (struct kvm_clear_dirty_log: slot, num_pages,
 * first_page, dirty_bitmap; bit i = page first_page + i of the slot): one ioctl_dirty_bitmap row per
 * 64-page word, then the ioctl's own row @r (reserved first; it takes the next seq and the time after
 * the words, so it sorts after them).  The loop body has no branch the verifier must follow (zero
 * words are recorded too, a full ring is counted without an if): with one, the states of every
 * iteration multiply past what the verifier accepts.  Each word row is a copy of a per-CPU scratch
 * record (ringbuf_output).  Returns how many words were read (at most MAX_BITMAP_WORDS), which the
 * ioctl row carries so that a reader knows whether the mask is complete.
 */
static __always_inline u32 record_clear_bitmap(struct mmu_record *r, u64 arg)
{
	u32 zero = 0, words = (rd_user(arg + 4, 4) + 63) / 64, i;
	u64 first = rd_user(arg + 8, 8), bitmap = rd_user(arg + 16, 8);
	struct cpu_stats *st = stats.lookup(&zero);
	struct mmu_record *w = bitmap_scratch.lookup(&zero);

	if (!st || !w)
		return 0;
	__builtin_memcpy(w, r, sizeof(*w));
	w->event = EV_ioctl_dirty_bitmap;
	w->seq = r->seq;
	w->f[0] = rd_user(arg, 4);
#pragma unroll
	for (i = 0; i < MAX_BITMAP_WORDS; i++) {
		if (i < words) {
			w->f[1] = first + 64 * i;
			w->f[2] = 0;
			bpf_probe_read_user(&w->f[2], 8, (void *)(bitmap + 8 * i));
			w->ts_ns = bpf_ktime_get_ns();
			/* a negative return (ring full) is a lost record */
			st->lost += (u64)events.ringbuf_output(w, sizeof(*w), BPF_RB_NO_WAKEUP) >> 63;
			w->seq = st->seq++;
		}
	}
	if (words > MAX_BITMAP_WORDS)
		words = MAX_BITMAP_WORDS;
	if (EV_ioctl_dirty_bitmap < NR_EVENTS)
		st->hits[EV_ioctl_dirty_bitmap] += words;
	r->seq = w->seq;
	r->ts_ns = bpf_ktime_get_ns();
	return words;
}

TRACEPOINT_PROBE(syscalls, sys_enter_ioctl)
{
	u32 cmd = args->cmd, event = ioctl_event(cmd);
	u64 arg = args->arg, file, obj, vm = 0;
	s32 vcpu_id = -1;

	if (((cmd >> 8) & 0xff) != KVMIO)
		return 0;
	if (cmd == KVM_RUN) {
		obj = file_private_data(fd_file(args->fd));
		learn_vcpu(obj, F(obj, kvm_vcpu__kvm), F(obj, kvm_vcpu__vcpu_id));
		return 0;
	}
	if (event == NR_EVENTS)
		return 0;
	file = fd_file(args->fd);
	if (cmd == KVM_ENABLE_CAP && !is_vm_file(file))
		return 0;	/* a vCPU capability */
	obj = file_private_data(file);
	if (cmd == KVM_SET_SREGS) {
		vm = F(obj, kvm_vcpu__kvm);
		vcpu_id = F(obj, kvm_vcpu__vcpu_id);
	} else if (cmd != KVM_CREATE_VM) {
		vm = obj;
	}
	BEGIN_ID(event, vm, vcpu_id);
	switch (cmd) {
	case KVM_SET_USER_MEMORY_REGION:
	case KVM_SET_USER_MEMORY_REGION2: {
		/* struct kvm_userspace_memory_region: slot, flags, guest_phys_addr, memory_size, userspace_addr */
		u64 gpa = rd_user(arg + 8, 8), size = rd_user(arg + 16, 8);
		r->f[0] = rd_user(arg, 4);
		r->f[1] = rd_user(arg + 4, 4);
		r->f[2] = gpa;
		r->f[3] = size;
		if (size >> 32)
			r->nulls |= 1 << 3;
		r->f[4] = gpa >> 12;
		r->f[5] = size >> 12;
		r->f[6] = rd_user(arg + 24, 8);
		break;
	}
	case KVM_SET_NR_MMU_PAGES:
	case KVM_CREATE_VCPU:
		r->f[0] = arg;
		break;
	case KVM_SET_SREGS:
		r->f[0] = rd_user(arg + SREGS_CR0, 8);
		r->f[1] = rd_user(arg + SREGS_CR3, 8);
		r->f[2] = rd_user(arg + SREGS_CR4, 8);
		r->f[3] = rd_user(arg + SREGS_EFER, 8);
		break;
	case KVM_GET_DIRTY_LOG:		/* struct kvm_dirty_log: slot, padding, bitmap */
		r->f[0] = rd_user(arg, 4);
		break;
	case KVM_CLEAR_DIRTY_LOG:	/* struct kvm_clear_dirty_log: slot, num_pages, first_page */
		r->f[0] = rd_user(arg, 4);
		r->f[1] = rd_user(arg + 8, 8);
		r->f[2] = rd_user(arg + 4, 4);
		if (WANT_ioctl_dirty_bitmap)
			r->f[3] = record_clear_bitmap(r, arg);
		else
			r->nulls |= 1 << 3;
		break;
	case KVM_ENABLE_CAP:		/* struct kvm_enable_cap: cap, flags, args[0] */
		r->f[0] = rd_user(arg, 4);
		r->f[1] = rd_user(arg + 8, 8);
		break;
	}
	record_end(r);
#if WANT_ioctl_ret
	struct pending_ioctl p = {.vm = vm, .cmd = cmd, .vcpu = vcpu_id};
	u32 tid = (u32)bpf_get_current_pid_tgid();
	ioctls.update(&tid, &p);
#endif
	return 0;
}

#if WANT_ioctl_ret
TRACEPOINT_PROBE(syscalls, sys_exit_ioctl)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct pending_ioctl *p = ioctls.lookup(&tid);
	s64 ret = args->ret;

	if (!p)
		return 0;
	u64 vm = p->vm;
	s32 vcpu_id = p->vcpu;
	u32 cmd = p->cmd;
	ioctls.delete(&tid);
	if (cmd == KVM_CREATE_VM && ret >= 0) {
		vm = file_private_data(fd_file(ret));	/* the new VM's fd */
		if (vm)
			own_vm(bpf_get_current_pid_tgid() >> 32, vm);
	}
	BEGIN(ioctl_ret, vm, vcpu_id);
	r->f[0] = cmd;
	r->f[1] = ret;
	record_end(r);
	return 0;
}
#endif

/* Children of a targeted process are targets too (a VMM that forks its vCPU workers). */
#if FILTER
TRACEPOINT_PROBE(sched, sched_process_fork)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32, child = args->child_pid;
	u8 one = 1;

	if (targets.lookup(&tgid))
		targets.update(&child, &one);
	return 0;
}
#endif
