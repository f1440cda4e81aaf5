using System.Buffers.Binary;

namespace ActorVmm.LibVmm;

/// <summary>
/// Why KVM_RUN returned, decoded from kvm_run into a typed record. Data the exit carries is
/// copied out, so a record stays valid after the next KVM_RUN.
/// </summary>
public abstract record VmExit
{
    /// <summary>Port I/O. For OUT, <see cref="Value"/> is the first element; with Count &gt; 1
    /// (rep outs) <see cref="Data"/> holds all Count × Size bytes. For IN, the vcpu must
    /// complete every element with <see cref="IVcpu.CompleteIoIn"/> before the next run.</summary>
    public sealed record Io(bool IsOut, ushort Port, int Size, uint Count, ulong Value, byte[]? Data) : VmExit;

    /// <summary>MMIO. For a write, <see cref="Value"/> holds <see cref="Length"/> bytes.</summary>
    public sealed record Mmio(ulong Address, bool IsWrite, int Length, ulong Value) : VmExit;

    public sealed record Hlt : VmExit { public static readonly Hlt Instance = new(); }

    /// <summary>A triple fault.</summary>
    public sealed record Shutdown : VmExit { public static readonly Shutdown Instance = new(); }

    /// <summary>KVM_RUN was interrupted by a signal (a kick) or immediate_exit was set.</summary>
    public sealed record Intr : VmExit { public static readonly Intr Instance = new(); }

    public sealed record IrqWindowOpen : VmExit { public static readonly IrqWindowOpen Instance = new(); }

    /// <summary>KVM could not run or emulate the guest. Suberror 1 is an emulation failure.</summary>
    public sealed record InternalError(uint Suberror, ulong[] Data) : VmExit
    {
        public const uint EmulationFailure = 1;
        public const uint SimulEx = 2;
        public const uint DeliveryEv = 3;
        public const uint UnexpectedExitReason = 4;

        public string SuberrorName => Suberror switch
        {
            EmulationFailure => "emulation failure",
            SimulEx => "simultaneous exceptions",
            DeliveryEv => "exception during event delivery",
            UnexpectedExitReason => "unexpected exit reason",
            _ => $"suberror {Suberror}",
        };
    }

    /// <summary>VM entry failed (invalid guest state).</summary>
    public sealed record FailEntry(ulong HardwareReason, uint Cpu) : VmExit;

    public sealed record MsrRead(uint Index, uint Reason) : VmExit;

    public sealed record MsrWrite(uint Index, ulong Value, uint Reason) : VmExit;

    public sealed record SystemEvent(uint Type, ulong[] Data) : VmExit
    {
        public const uint ShutdownType = 1;
        public const uint ResetType = 2;
        public const uint CrashType = 3;
    }

    /// <summary>KVM_EXIT_IOAPIC_EOI: with a split irqchip, the guest EOIed a vector that a
    /// level-triggered IOAPIC route names (the user-space IOAPIC clears its remote IRR).</summary>
    public sealed record IoapicEoi(byte Vector) : VmExit;

    /// <summary>KVM_EXIT_SET_TPR: without an in-kernel local APIC, the guest lowered CR8 (its task
    /// priority); <c>kvm_run.cr8</c> holds the new value.</summary>
    public sealed record SetTpr : VmExit { public static readonly SetTpr Instance = new(); }

    /// <summary>KVM_EXIT_DIRTY_RING_FULL: the vcpu's dirty ring is (softly) full; KVM runs the vcpu
    /// again only after its entries were harvested and reset (<see cref="VcpuHandle.HarvestDirtyRing"/>).</summary>
    public sealed record DirtyRingFull : VmExit { public static readonly DirtyRingFull Instance = new(); }

    public sealed record Unknown(uint Reason) : VmExit;

    /// <summary>Decodes the exit the kvm_run page describes.</summary>
    public static VmExit Decode(KvmRunView run)
    {
        switch (run.ExitReason)
        {
            case KvmExitReason.Io:
            {
                var size = run.IoSize;
                var count = run.IoCount;
                if (!run.IoIsOut) return new Io(false, run.IoPort, size, count, 0, null);
                var data = run.IoData;
                var value = ReadLittle(data, size);
                return new Io(true, run.IoPort, size, count, value, count > 1 ? data.ToArray() : null);
            }
            case KvmExitReason.Mmio:
            {
                var len = (int)Math.Min(run.MmioLen, 8u);
                var value = run.MmioIsWrite ? ReadLittle(run.MmioData, len) : 0;
                return new Mmio(run.MmioPhysAddr, run.MmioIsWrite, len, value);
            }
            case KvmExitReason.Hlt: return Hlt.Instance;
            case KvmExitReason.Shutdown: return Shutdown.Instance;
            case KvmExitReason.Intr: return Intr.Instance;
            case KvmExitReason.IrqWindowOpen: return IrqWindowOpen.Instance;
            case KvmExitReason.InternalError:
            {
                var n = (int)Math.Min(run.InternalNdata, 16u);
                var data = new ulong[n];
                for (var i = 0; i < n; i++) data[i] = run.InternalData(i);
                return new InternalError(run.InternalSuberror, data);
            }
            case KvmExitReason.FailEntry: return new FailEntry(run.FailEntryReason, run.FailEntryCpu);
            case KvmExitReason.X86Rdmsr: return new MsrRead(run.MsrIndex, run.MsrReason);
            case KvmExitReason.X86Wrmsr: return new MsrWrite(run.MsrIndex, run.MsrData, run.MsrReason);
            case KvmExitReason.SystemEvent:
            {
                var n = (int)Math.Min(run.SystemEventNdata, 16u);
                var data = new ulong[n];
                for (var i = 0; i < n; i++) data[i] = run.SystemEventData(i);
                return new SystemEvent(run.SystemEventType, data);
            }
            case KvmExitReason.IoapicEoi: return new IoapicEoi(run.IoapicEoiVector);
            case KvmExitReason.SetTpr: return SetTpr.Instance;
            case KvmExitReason.DirtyRingFull: return DirtyRingFull.Instance;
            default: return new Unknown((uint)run.ExitReason);
        }
    }

    /// <summary>The first <paramref name="size"/> bytes of <paramref name="data"/> (at most 8) as a
    /// little-endian value, x86's byte order; 0 for none.</summary>
    internal static ulong ReadLittle(ReadOnlySpan<byte> data, int size)
    {
        Span<byte> value = stackalloc byte[8];
        value.Clear();
        data[..Math.Clamp(Math.Min(size, data.Length), 0, 8)].CopyTo(value);
        return BinaryPrimitives.ReadUInt64LittleEndian(value);
    }

    /// <summary>Writes the low bytes of <paramref name="value"/>, little-endian, over all of
    /// <paramref name="data"/> (at most 8 bytes).</summary>
    internal static void WriteLittle(Span<byte> data, ulong value)
    {
        Span<byte> bytes = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, value);
        bytes[..Math.Min(data.Length, 8)].CopyTo(data);
    }
}
