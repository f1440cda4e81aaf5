namespace ActorVmm.Vcpu;

/// <summary>
/// What the vcpu does at its next entry, as <see cref="InterruptInjector.PlanEntry"/> decided:
/// <see cref="Nmis"/> KVM_NMIs, then KVM_INTERRUPT of <see cref="Vector"/> (told to the vlapic as
/// accepted when <see cref="FromLapic"/>), or an INTA to the 8259 first (<see cref="AskPic"/>: the
/// vcpu waits for the vector), and KVM's interrupt window requested or not.
/// </summary>
internal readonly record struct EntryPlan(int Nmis, byte? Vector, bool FromLapic, bool AskPic, bool RequestWindow);

/// <summary>
/// The interrupts waiting for a vcpu's next entry, without KVM or Akka (the vcpu side of the seed's
/// vlapic_pending_intr / vlapic_intr_accepted):
/// <list type="bullet">
/// <item>vectors asked for with <c>InjectInterrupt</c>, in order, first;</item>
/// <item>the vlapic's pending vector: the newest report wins (<see cref="LapicPending"/>), and CR8
///   holds it back while its priority class is not above CR8 (SDM Vol 3A §10.8.3.1, CR8 = TPR[7:4]);</item>
/// <item>an ExtINT, whose vector the 8259 gives on INTA (its level stays pending while the PIC
///   still requests);</item>
/// <item>NMIs: each one becomes a KVM_NMI, at most <see cref="MaxNmisPerEntry"/> per entry. KVM
///   keeps what the SDM does of them (Vol 3A §6.7.1): one taken and one latched until the handler's
///   IRET; the rest are lost, as NMIs arriving while one is already latched are on a processor.
///   NMIs that arrive together here would have come one after the other on a processor, the first
///   taken at once: one pending flag would lose the second.</item>
/// </list>
/// KVM takes one KVM_INTERRUPT per entry: after one, nothing more goes in until the next exit
/// (<see cref="Exited"/>). Owned by the vcpu's thread.
/// </summary>
internal sealed class InterruptInjector
{
    /// <summary>At most this many NMIs are kept for one entry: one taken, one latched (SDM Vol 3A §6.7.1).</summary>
    public const int MaxNmisPerEntry = 2;

    private readonly Queue<byte> _requested = new();
    private byte? _lapicVector;
    private long _lapicSeq;
    private int _nmis;
    private bool _extInt;
    private bool _queued;

    /// <summary>The guest's CR8 as of the last exit (an emulated local APIC); 0 with KVM's.</summary>
    public byte Cr8 { get; set; }

    /// <summary>The trace id of the report that made the vlapic's vector pending: the causal parent
    /// of its acceptance, which goes out at a later entry (0 when untraced).</summary>
    public long LapicCause { get; private set; }

    /// <summary>Vectors handed to KVM_INTERRUPT so far.</summary>
    public long Injected { get; private set; }

    /// <summary>Something would wake the vcpu from HLT (a vector CR8 holds back included: HLT ends
    /// at an interrupt the APIC holds pending, and the guest may lower CR8 next).</summary>
    public bool AnyPending => _requested.Count > 0 || _lapicVector is not null || _nmis > 0 || _extInt;

    /// <summary>A vector to inject as soon as the guest can take it (after those asked for before).</summary>
    public void Request(byte vector) => _requested.Enqueue(vector);

    /// <summary>The vlapic's report <paramref name="seq"/> (0: unnumbered, taken as new). False when
    /// it is a duplicate or older than one already seen: it changes nothing.</summary>
    public bool LapicPending(byte vector, long seq, long cause)
    {
        if (seq != 0 && seq <= _lapicSeq) return false;
        if (seq != 0) _lapicSeq = seq;
        _lapicVector = vector;
        LapicCause = cause;
        return true;
    }

    /// <summary>The vlapic's vector is no longer deliverable; what was injected already stays injected.</summary>
    public void LapicWithdrawn(long seq)
    {
        if (seq <= _lapicSeq) return;
        _lapicSeq = seq;
        _lapicVector = null;
    }

    public void Nmi() => _nmis = Math.Min(_nmis + 1, MaxNmisPerEntry);

    public void ExtInt() => _extInt = true;

    /// <summary>INIT (SDM Vol 3A §8.4, Table 9-1): everything pending is dropped (the vlapic reset itself).</summary>
    public void Init()
    {
        _requested.Clear();
        _lapicVector = null;
        _nmis = 0;
        _extInt = false;
    }

    /// <summary>What a snapshot keeps of this (see <see cref="PendingInterruptsState"/>); the vlapic's
    /// vector is not in it: the vlapic offers it again after a restore.</summary>
    public PendingInterruptsState Save() => new([.. _requested], _nmis, _extInt, _queued, Cr8, Injected);

    /// <summary>Takes back what <see cref="Save"/> kept. The vlapic's vector and report number are
    /// left alone: a restored vlapic may have offered its vector already, numbered from its own start.</summary>
    public void Restore(PendingInterruptsState state)
    {
        _requested.Clear();
        foreach (var vector in state.Requested) _requested.Enqueue(vector);
        _nmis = Math.Clamp(state.Nmis, 0, MaxNmisPerEntry);
        _extInt = state.ExtInt;
        _queued = state.Queued;
        Cr8 = (byte)(state.Cr8 & 0xF);
        Injected = state.Injected;
    }

    /// <summary>The vcpu left the guest: KVM took what was queued for that entry.</summary>
    public void Exited() => _queued = false;

    /// <summary>
    /// Before an entry: every NMI, then at most one external interrupt if the guest can take one
    /// (<paramref name="ready"/>: KVM's ready_for_interrupt_injection as of the last exit) — a
    /// requested vector, else the vlapic's unless CR8 holds it back, else an ExtINT (INTA first).
    /// KVM_EXIT_IRQ_WINDOW_OPEN is not reported on every host: the window is asked for while anything
    /// is pending, and the vcpu re-plans at every exit anyway. A vector CR8 holds back waits for the
    /// exit that lowers CR8: no window for it.
    /// </summary>
    public EntryPlan PlanEntry(bool ready)
    {
        var nmis = _nmis;
        _nmis = 0;
        byte? vector = null;
        bool fromLapic = false, askPic = false;
        if (!_queued && ready)
        {
            if (_requested.TryDequeue(out var requested)) vector = requested;
            else if (_lapicVector is { } v && Deliverable(v))
            {
                _lapicVector = null;
                vector = v;
                fromLapic = true;
            }
            else if (_extInt) askPic = true;
        }
        if (vector is not null) Queued();
        if (askPic) return new EntryPlan(nmis, null, false, true, false);
        var window = _requested.Count > 0 || _lapicVector is { } w && Deliverable(w) || _extInt;
        return new EntryPlan(nmis, vector, fromLapic, false, window);
    }

    /// <summary>The 8259's answer to INTA: the vector to inject now (null: none, a spurious INTA).
    /// INTR is a level: it stays pending while the PIC still requests and gave a vector.</summary>
    public byte? Acknowledged(int? vector, bool stillRequested)
    {
        _extInt = stillRequested && vector is not null;
        if (vector is null) return null;
        Queued();
        return (byte)vector;
    }

    private bool Deliverable(byte vector) => vector >> 4 > Cr8;

    private void Queued()
    {
        _queued = true;
        Injected++;
    }
}
