using System.Reflection;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace ActorVmm.LibVmm.Tests;

/// <summary>LibVmm's structs, kvm_run offsets and ioctl numbers against <see cref="KernelAbi"/> and
/// the numbers gcc printed from linux/kvm.h.</summary>
public sealed class StructLayoutTests
{
    private static int Offset<T>(string field) => (int)Marshal.OffsetOf<T>(field);

    /// <summary>Both the marshaller's size and the size pointer code (ioctl buffers) uses.</summary>
    private static void AssertSize<T>(int expected) where T : struct
    {
        Assert.Equal(expected, Marshal.SizeOf<T>());
        Assert.Equal(expected, Unsafe.SizeOf<T>());
    }

    [Fact]
    public void Kvm_run_offsets_match_the_kernel_header()
    {
        Assert.Equal(KernelAbi.KvmRunSize, KvmRunView.Size);
        Assert.Equal(KernelAbi.RequestInterruptWindow, KvmRunView.RequestInterruptWindowOffset);
        Assert.Equal(KernelAbi.ImmediateExit, KvmRunView.ImmediateExitOffset);
        Assert.Equal(KernelAbi.ExitReason, KvmRunView.ExitReasonOffset);
        Assert.Equal(KernelAbi.ReadyForInterruptInjection, KvmRunView.ReadyForInterruptInjectionOffset);
        Assert.Equal(KernelAbi.IfFlag, KvmRunView.IfFlagOffset);
        Assert.Equal(KernelAbi.Flags, KvmRunView.FlagsOffset);
        Assert.Equal(KernelAbi.Cr8, KvmRunView.Cr8Offset);
        Assert.Equal(KernelAbi.ApicBase, KvmRunView.ApicBaseOffset);
        Assert.Equal(32, KvmRunView.UnionOffset);

        Assert.Equal(KernelAbi.IoDirection, KvmRunView.IoDirectionOffset);
        Assert.Equal(KernelAbi.IoSize, KvmRunView.IoSizeOffset);
        Assert.Equal(KernelAbi.IoPort, KvmRunView.IoPortOffset);
        Assert.Equal(KernelAbi.IoCount, KvmRunView.IoCountOffset);
        Assert.Equal(KernelAbi.IoDataOffset, KvmRunView.IoDataOffsetOffset);

        Assert.Equal(KernelAbi.MmioPhysAddr, KvmRunView.MmioPhysAddrOffset);
        Assert.Equal(KernelAbi.MmioData, KvmRunView.MmioDataOffset);
        Assert.Equal(KernelAbi.MmioLen, KvmRunView.MmioLenOffset);
        Assert.Equal(KernelAbi.MmioIsWrite, KvmRunView.MmioIsWriteOffset);

        Assert.Equal(KernelAbi.MsrError, KvmRunView.MsrErrorOffset);
        Assert.Equal(KernelAbi.MsrReason, KvmRunView.MsrReasonOffset);
        Assert.Equal(KernelAbi.MsrIndex, KvmRunView.MsrIndexOffset);
        Assert.Equal(KernelAbi.MsrData, KvmRunView.MsrDataOffset);

        Assert.Equal(KernelAbi.InternalSuberror, KvmRunView.InternalSuberrorOffset);
        Assert.Equal(KernelAbi.InternalNdata, KvmRunView.InternalNdataOffset);
        Assert.Equal(KernelAbi.InternalData, KvmRunView.InternalDataOffset);

        Assert.Equal(KernelAbi.FailEntryReason, KvmRunView.FailEntryReasonOffset);
        Assert.Equal(KernelAbi.FailEntryCpu, KvmRunView.FailEntryCpuOffset);

        Assert.Equal(KernelAbi.SystemEventType, KvmRunView.SystemEventTypeOffset);
        Assert.Equal(KernelAbi.SystemEventNdata, KvmRunView.SystemEventNdataOffset);
        Assert.Equal(KernelAbi.SystemEventData, KvmRunView.SystemEventDataOffset);

        Assert.Equal(KernelAbi.KvmValidRegs, KvmRunView.KvmValidRegsOffset);
        Assert.Equal(KernelAbi.SyncRegs, KvmRunView.SyncRegsOffset);
    }

    [Fact]
    public void Kvm_struct_sizes_match_the_kernel_header()
    {
        AssertSize<KvmRegs>(144);
        AssertSize<KvmSregs>(312);
        AssertSize<KvmSegment>(24);
        AssertSize<KvmDtable>(16);
        AssertSize<KvmFpu>(416);
        AssertSize<KvmUserspaceMemoryRegion>(32);
        AssertSize<KvmCpuidEntry2>(40);
        AssertSize<KvmMsrEntry>(16);
        AssertSize<KvmEnableCap>(104);
        AssertSize<KvmDirtyLog>(16);
        AssertSize<KvmClearDirtyLog>(24);
    }

    [Fact]
    public void Kvm_dirty_gfn_and_the_ring_offset_match_the_kernel_header()
    {
        AssertSize<KvmDirtyGfn>(KernelAbi.DirtyGfnSize);
        Assert.Equal(KernelAbi.DirtyGfnFlags, Offset<KvmDirtyGfn>(nameof(KvmDirtyGfn.Flags)));
        Assert.Equal(KernelAbi.DirtyGfnSlot, Offset<KvmDirtyGfn>(nameof(KvmDirtyGfn.Slot)));
        Assert.Equal(KernelAbi.DirtyGfnOffset, Offset<KvmDirtyGfn>(nameof(KvmDirtyGfn.Offset)));
        Assert.Equal(KernelAbi.DirtyGfnFlagDirty, KvmDirtyGfn.FlagDirty);
        Assert.Equal(KernelAbi.DirtyGfnFlagReset, KvmDirtyGfn.FlagReset);
        Assert.Equal(KernelAbi.DirtyLogPageOffset, DirtyRing.PageOffset);
        Assert.Equal(KernelAbi.CapDirtyLogRing, (uint)KvmCap.DirtyLogRing);
        Assert.Equal(KernelAbi.CapDirtyLogRingAcqRel, (uint)KvmCap.DirtyLogRingAcqRel);
    }

    [Fact]
    public void Glibc_rlimit_and_stat_mode_match_x86_64()
    {
        AssertSize<Native.RLimit>(KernelAbi.RLimitSize);
        Assert.Equal(KernelAbi.RlimitMemlock, Native.RLIMIT_MEMLOCK);
        var mode = typeof(SharedMemoryRegion).GetField("StatModeOffset", BindingFlags.NonPublic | BindingFlags.Static);
        Assert.NotNull(mode);
        Assert.Equal(KernelAbi.StatMode, (int)mode.GetValue(null)!);
    }

    [Fact]
    public void Kvm_sregs_offsets_match_the_kernel_header()
    {
        Assert.Equal(0, Offset<KvmSregs>(nameof(KvmSregs.Cs)));
        Assert.Equal(192, Offset<KvmSregs>(nameof(KvmSregs.Gdt)));
        Assert.Equal(224, Offset<KvmSregs>(nameof(KvmSregs.Cr0)));
        Assert.Equal(264, Offset<KvmSregs>(nameof(KvmSregs.Efer)));
        Assert.Equal(272, Offset<KvmSregs>(nameof(KvmSregs.ApicBase)));
        Assert.Equal(280, Offset<KvmSregs>(nameof(KvmSregs.InterruptBitmap)));
    }

    [Fact]
    public void Kvm_regs_rip_and_rflags_come_after_the_sixteen_gprs()
    {
        Assert.Equal(128, Offset<KvmRegs>(nameof(KvmRegs.Rip)));
        Assert.Equal(136, Offset<KvmRegs>(nameof(KvmRegs.Rflags)));
    }

    [Fact]
    public void Glibc_sigaction_layout_matches_x86_64()
    {
        AssertSize<Native.SigAction>(152);
        Assert.Equal(0, Offset<Native.SigAction>(nameof(Native.SigAction.Handler)));
        Assert.Equal(136, Offset<Native.SigAction>(nameof(Native.SigAction.Flags)));
        Assert.Equal(144, Offset<Native.SigAction>(nameof(Native.SigAction.Restorer)));
    }

    [Fact]
    public void Kvm_translation_is_the_24_bytes_KVM_TRANSLATE_encodes()
    {
        var type = typeof(VcpuHandle).GetNestedType("KvmTranslation", BindingFlags.NonPublic);
        Assert.NotNull(type);
        Assert.Equal(24, Marshal.SizeOf(type));
    }

    [Theory]
    [InlineData(nameof(KvmIoctl.GetApiVersion), 44544ul)]
    [InlineData(nameof(KvmIoctl.CreateVm), 44545ul)]
    [InlineData(nameof(KvmIoctl.CheckExtension), 44547ul)]
    [InlineData(nameof(KvmIoctl.GetVcpuMmapSize), 44548ul)]
    [InlineData(nameof(KvmIoctl.GetSupportedCpuid), 3221794309ul)]
    [InlineData(nameof(KvmIoctl.CreateVcpu), 44609ul)]
    [InlineData(nameof(KvmIoctl.SetUserMemoryRegion), 1075883590ul)]
    [InlineData(nameof(KvmIoctl.Run), 44672ul)]
    [InlineData(nameof(KvmIoctl.GetRegs), 2156965505ul)]
    [InlineData(nameof(KvmIoctl.SetRegs), 1083223682ul)]
    [InlineData(nameof(KvmIoctl.GetSregs), 2167975555ul)]
    [InlineData(nameof(KvmIoctl.SetSregs), 1094233732ul)]
    [InlineData(nameof(KvmIoctl.GetFpu), 2174791308ul)]
    [InlineData(nameof(KvmIoctl.SetFpu), 1101049485ul)]
    [InlineData(nameof(KvmIoctl.GetMsrs), 3221794440ul)]
    [InlineData(nameof(KvmIoctl.SetMsrs), 1074310793ul)]
    [InlineData(nameof(KvmIoctl.SetCpuid2), 1074310800ul)]
    [InlineData(nameof(KvmIoctl.Interrupt), 1074048646ul)]
    [InlineData(nameof(KvmIoctl.EnableCap), 1080602275ul)]
    [InlineData(nameof(KvmIoctl.SetTssAddr), 44615ul)]
    [InlineData(nameof(KvmIoctl.SetIdentityMapAddr), 1074310728ul)]
    [InlineData(nameof(KvmIoctl.X86SetMsrFilter), 1099476678ul)]
    [InlineData(nameof(KvmIoctl.GetMsrIndexList), 3221532162ul)]
    [InlineData(nameof(KvmIoctl.GetDirtyLog), 1074835010ul)]
    [InlineData(nameof(KvmIoctl.ClearDirtyLog), 3222843072ul)]
    [InlineData(nameof(KvmIoctl.ResetDirtyRings), 44743ul)]
    public void Ioctl_number_matches_the_kernel_header(string name, ulong expected)
    {
        var field = typeof(KvmIoctl).GetField(name, BindingFlags.Public | BindingFlags.Static);
        Assert.NotNull(field);
        Assert.Equal(expected, (ulong)(nuint)field.GetValue(null)!);
    }

    [Fact]
    public void Kvm_translate_is_iowr_0x85_of_24_bytes()
    {
        // _IOWR(KVMIO, 0x85, struct kvm_translation): dir=read|write (3) <<30, size<<16, type<<8, nr.
        const ulong expected = (3ul << 30) | (24ul << 16) | (0xAEul << 8) | 0x85;
        Assert.Equal(0xC018_AE85ul, expected);
        Assert.Equal(expected, (ulong)KvmIoctl.Translate);
    }

    [Theory]
    [InlineData(KvmExitReason.Io, KernelAbi.ExitIo)]
    [InlineData(KvmExitReason.Hlt, KernelAbi.ExitHlt)]
    [InlineData(KvmExitReason.Mmio, KernelAbi.ExitMmio)]
    [InlineData(KvmExitReason.Shutdown, KernelAbi.ExitShutdown)]
    [InlineData(KvmExitReason.FailEntry, KernelAbi.ExitFailEntry)]
    [InlineData(KvmExitReason.Intr, KernelAbi.ExitIntr)]
    [InlineData(KvmExitReason.InternalError, KernelAbi.ExitInternalError)]
    [InlineData(KvmExitReason.SystemEvent, KernelAbi.ExitSystemEvent)]
    [InlineData(KvmExitReason.X86Rdmsr, KernelAbi.ExitX86Rdmsr)]
    [InlineData(KvmExitReason.X86Wrmsr, KernelAbi.ExitX86Wrmsr)]
    [InlineData(KvmExitReason.DirtyRingFull, KernelAbi.ExitDirtyRingFull)]
    public void Exit_reason_matches_the_kernel_header(KvmExitReason reason, uint expected) =>
        Assert.Equal(expected, (uint)reason);
}
