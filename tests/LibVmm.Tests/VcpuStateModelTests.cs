using System.Reflection;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace ActorVmm.LibVmm.Tests;

/// <summary>The snapshot state's KVM structs and ioctl numbers against the numbers gcc printed from
/// linux/kvm.h and asm/kvm.h (x86-64), and the state records' rules. Runs without KVM.</summary>
public sealed class VcpuStateModelTests
{
    private static int Offset<T>(string field) => (int)Marshal.OffsetOf<T>(field);

    private static void AssertSize<T>(int expected) where T : struct
    {
        Assert.Equal(expected, Marshal.SizeOf<T>());
        Assert.Equal(expected, Unsafe.SizeOf<T>());
    }

    [Fact]
    public void State_structs_match_the_kernel_header()
    {
        AssertSize<KvmVcpuEvents>(64);
        Assert.Equal(8, Offset<KvmVcpuEvents>(nameof(KvmVcpuEvents.InterruptInjected)));
        Assert.Equal(12, Offset<KvmVcpuEvents>(nameof(KvmVcpuEvents.NmiInjected)));
        Assert.Equal(16, Offset<KvmVcpuEvents>(nameof(KvmVcpuEvents.SipiVector)));
        Assert.Equal(20, Offset<KvmVcpuEvents>(nameof(KvmVcpuEvents.Flags)));
        Assert.Equal(24, Offset<KvmVcpuEvents>(nameof(KvmVcpuEvents.SmiSmm)));
        Assert.Equal(28, Offset<KvmVcpuEvents>(nameof(KvmVcpuEvents.TripleFaultPending)));
        Assert.Equal(55, Offset<KvmVcpuEvents>(nameof(KvmVcpuEvents.ExceptionHasPayload)));
        Assert.Equal(56, Offset<KvmVcpuEvents>(nameof(KvmVcpuEvents.ExceptionPayload)));
        AssertSize<KvmDebugRegs>(128);
        Assert.Equal(32, Offset<KvmDebugRegs>(nameof(KvmDebugRegs.Dr6)));
        Assert.Equal(40, Offset<KvmDebugRegs>(nameof(KvmDebugRegs.Dr7)));
        Assert.Equal(48, Offset<KvmDebugRegs>(nameof(KvmDebugRegs.Flags)));
        AssertSize<KvmClockData>(48);
        Assert.Equal(8, Offset<KvmClockData>(nameof(KvmClockData.Flags)));
        Assert.Equal(16, Offset<KvmClockData>(nameof(KvmClockData.Realtime)));
        Assert.Equal(24, Offset<KvmClockData>(nameof(KvmClockData.HostTsc)));
        AssertSize<KvmDeviceAttr>(24);
        Assert.Equal(392, KvmStateSizes.Xcrs);
        Assert.Equal(4096, KvmStateSizes.Xsave);
        Assert.Equal(1024, KvmStateSizes.Lapic);
    }

    [Fact]
    public void State_flags_and_capabilities_match_the_kernel_header()
    {
        Assert.Equal(1u, KvmVcpuEvents.ValidNmiPending);
        Assert.Equal(2u, KvmVcpuEvents.ValidSipiVector);
        Assert.Equal(4u, KvmVcpuEvents.ValidShadow);
        Assert.Equal(8u, KvmVcpuEvents.ValidSmm);
        Assert.Equal(2u, KvmClockData.TscStable);
        Assert.Equal(4u, KvmClockData.RealtimeValid);
        Assert.Equal(8u, KvmClockData.HostTscValid);
        Assert.Equal(39u, (uint)KvmCap.AdjustClock);
        Assert.Equal(41u, (uint)KvmCap.VcpuEvents);
        Assert.Equal(50u, (uint)KvmCap.DebugRegs);
        Assert.Equal(55u, (uint)KvmCap.Xsave);
        Assert.Equal(56u, (uint)KvmCap.Xcrs);
        Assert.Equal(127u, (uint)KvmCap.VcpuAttributes);
    }

    [Theory]
    [InlineData(nameof(KvmStateIoctl.GetClock), 2150674044ul)]
    [InlineData(nameof(KvmStateIoctl.SetClock), 1076932219ul)]
    [InlineData(nameof(KvmStateIoctl.GetVcpuEvents), 2151722655ul)]
    [InlineData(nameof(KvmStateIoctl.SetVcpuEvents), 1077980832ul)]
    [InlineData(nameof(KvmStateIoctl.GetDebugRegs), 2155916961ul)]
    [InlineData(nameof(KvmStateIoctl.SetDebugRegs), 1082175138ul)]
    [InlineData(nameof(KvmStateIoctl.GetXsave), 2415963812ul)]
    [InlineData(nameof(KvmStateIoctl.SetXsave), 1342221989ul)]
    [InlineData(nameof(KvmStateIoctl.GetXcrs), 2173218470ul)]
    [InlineData(nameof(KvmStateIoctl.SetXcrs), 1099476647ul)]
    [InlineData(nameof(KvmStateIoctl.SetDeviceAttr), 1075359457ul)]
    [InlineData(nameof(KvmStateIoctl.GetDeviceAttr), 1075359458ul)]
    [InlineData(nameof(KvmStateIoctl.HasDeviceAttr), 1075359459ul)]
    [InlineData(nameof(KvmStateIoctl.GetCpuid2), 3221794449ul)]
    public void State_ioctl_numbers_match_the_kernel_header(string name, ulong expected)
    {
        var field = typeof(KvmStateIoctl).GetField(name, BindingFlags.Public | BindingFlags.Static);
        Assert.NotNull(field);
        Assert.Equal(expected, (ulong)(nuint)field.GetValue(null)!);
    }

    private static VcpuKvmState State(ulong kernelGsBase = 0x1234, byte[]? lapic = null) => new()
    {
        Registers = new byte[KvmStateSizes.Regs],
        SpecialRegisters = new byte[KvmStateSizes.Sregs],
        Fpu = new byte[KvmStateSizes.Fpu],
        DebugRegisters = new byte[KvmStateSizes.DebugRegs],
        Events = new byte[KvmStateSizes.VcpuEvents],
        Msrs = [new(SavedMsrs.Tsc, 1000), new(SavedMsrs.KernelGsBase, kernelGsBase)],
        Lapic = lapic,
        MpState = lapic is null ? null : KvmMpState.Runnable,
    };

    [Fact]
    public void Two_states_are_equal_when_every_part_is_equal_byte_for_byte()
    {
        Assert.Equal(State(), State());
        Assert.NotEqual(State(), State(kernelGsBase: 0x5678));
        Assert.NotEqual(State(), State() with { Registers = [.. new byte[KvmStateSizes.Regs - 1], 1] });
        Assert.NotEqual(State(), State(lapic: new byte[KvmStateSizes.Lapic]));
        Assert.Equal(State(lapic: new byte[KvmStateSizes.Lapic]), State(lapic: new byte[KvmStateSizes.Lapic]));
        Assert.Equal(1000ul, State().Tsc);
        Assert.Null(State().Msr(SavedMsrs.Star));
    }

    [Fact]
    public void A_state_with_a_part_of_the_wrong_size_is_refused_naming_the_part()
    {
        State().Validate();
        var e = Assert.Throws<ArgumentException>(() => (State() with { SpecialRegisters = new byte[300] }).Validate());
        Assert.Contains("SpecialRegisters is 300 bytes", e.Message);
        e = Assert.Throws<ArgumentException>(() => (State() with { Xsave = new byte[512] }).Validate());
        Assert.Contains("Xsave", e.Message);
        e = Assert.Throws<ArgumentException>(() => (State() with { Lapic = new byte[KvmStateSizes.Lapic] }).Validate());
        Assert.Contains("MP state", e.Message);
        e = Assert.Throws<ArgumentException>(() => (State() with { Xcrs = new XcrValue[17] }).Validate());
        Assert.Contains("17 XCRs", e.Message);
    }

    [Fact]
    public void The_typed_views_decode_the_kernel_images()
    {
        var regs = new KvmRegs { Rip = 0x1234, Rbx = 7 };
        var events = new KvmVcpuEvents { NmiPending = 1, InterruptShadow = KvmVcpuEvents.ShadowSti };
        var state = State() with { Registers = VcpuKvmState.Image(regs), Events = VcpuKvmState.Image(events) };
        Assert.Equal(0x1234ul, state.GetRegs().Rip);
        Assert.Equal(7ul, state.GetRegs().Rbx);
        Assert.Equal(1, state.GetVcpuEvents().NmiPending);
        Assert.Equal(KvmVcpuEvents.ShadowSti, state.GetVcpuEvents().InterruptShadow);
    }

    [Fact]
    public void The_msrs_saved_are_the_listed_ones_kvm_reports_with_the_tsc_first_and_the_deadline_last()
    {
        uint[] kvmList = [SavedMsrs.TscDeadline, SavedMsrs.KvmAsyncPfEn, 0xC000_0080, SavedMsrs.Star, SavedMsrs.KvmAsyncPfInt, SavedMsrs.Tsc, 0x1B];
        Assert.Equal([SavedMsrs.Tsc, SavedMsrs.Star, SavedMsrs.KvmAsyncPfInt, SavedMsrs.KvmAsyncPfEn, SavedMsrs.TscDeadline],
            SavedMsrs.ToSave(kvmList, kvmLocalApic: true));
        // Without KVM's local APIC there is no TSC deadline to keep; EFER and APIC_BASE are in kvm_sregs.
        Assert.Equal([SavedMsrs.Tsc, SavedMsrs.Star, SavedMsrs.KvmAsyncPfInt, SavedMsrs.KvmAsyncPfEn],
            SavedMsrs.ToSave(kvmList, kvmLocalApic: false));
        Assert.Equal(SavedMsrs.Tsc, SavedMsrs.RestoreOrder[0]);
        Assert.Equal(SavedMsrs.TscDeadline, SavedMsrs.RestoreOrder[^1]);
    }

    [Fact]
    public void A_clock_brought_to_now_gains_the_elapsed_realtime_and_never_goes_back()
    {
        var saved = new VmKvmState(Clock: 5_000_000_000, Flags: 0, RealtimeNs: 1_700_000_000_000_000_000, HostTsc: null);
        Assert.Equal(5_250_000_000ul, saved.ClockAt(1_700_000_000_250_000_000, bringWallClockToNow: true));
        Assert.Equal(5_000_000_000ul, saved.ClockAt(1_700_000_000_250_000_000, bringWallClockToNow: false));
        // The host's realtime is earlier than at the save (stepped back, another host): no step back.
        Assert.Equal(5_000_000_000ul, saved.ClockAt(1_699_999_999_000_000_000, bringWallClockToNow: true));
    }
}
