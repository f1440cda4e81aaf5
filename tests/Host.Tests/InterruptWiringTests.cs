using Akka.Actor;
using Akka.Configuration;
using Akka.TestKit.Xunit2;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.Host.Vm;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Vcpu;
using ActorVmm.Vcpu.Tests;
using Xunit;
using Xunit.Abstractions;
using static ActorVmm.Host.Vm.VmProtocol;

namespace ActorVmm.Host.Tests;

/// <summary>
/// A real VM actor with its real vlapics, APIC router, IOAPIC, 8259 pair, PIT, RTC and UART
/// actors, and scripted vcpus: the guest's accesses are scripted exits, and what reaches a vcpu
/// is what its fake records (KVM_INTERRUPT vectors, SIPI registers, MSR completions).
/// </summary>
public sealed class InterruptWiringTests : ScriptedVmTestKit
{
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(10);
    private const ulong Lapic = 0xFEE0_0000;
    private const ulong IoApicBase = 0xFEC0_0000;


    static InterruptWiringTests()
    {
        ThreadPool.GetMinThreads(out var workers, out var io);
        ThreadPool.SetMinThreads(Math.Max(workers, 32), io);
    }

    public InterruptWiringTests(ITestOutputHelper output) : base(output)
    {
    }

    /// <summary>The PC interrupt platform with emulated local APICs, LINT0 of the BSP as ExtINT.</summary>
    private ScriptedVm Start(int cpus) =>
        Vms.Start(cpus, interruptPlatform: true, lapic: LapicBackends.Emulated(new LapicOptions { BspLint0ExtInt = true }));


    private static VmExit.Mmio MmioWrite(ulong address, uint value) => new(address, true, 4, value);
    private static VmExit.Io Out(ushort port, byte value) => new(true, port, 1, 1, value, null);
    private static VmExit.Io In(ushort port) => new(false, port, 1, 1, 0, null);

    /// <summary>SVR: APIC software-enabled, spurious vector 0xFF.</summary>
    private static VmExit.Mmio EnableApic() => MmioWrite(Lapic + 0xF0, 0x1FF);

    private async Task<IActorRef> Child(ScriptedVm rig, string name) => await Sys.ActorSelection(rig.Vm.Path / name).ResolveOne(Wait);

    /// <summary>Starts an AP without INIT-SIPI (as if it had been brought up) and enables its APIC.</summary>
    private async Task StartAp(ScriptedVm rig, int id)
    {
        (await Child(rig, $"vcpu-{id}")).Tell(VcpuProtocol.Start.Instance);
        Assert.True(rig.Vcpus[id].WaitUntilIdleInGuest(), $"vcpu {id} did not start");
        rig.Vcpus[id].Supply(EnableApic());
        Assert.True(rig.Vcpus[id].WaitUntilIdleInGuest());
    }

    private async Task<uint> ReadVlapic(ScriptedVm rig, int id, ulong offset)
    {
        (await Child(rig, $"vlapic-{id}")).Tell(new DeviceProtocol.Read(7, offset, 4));
        return (uint)(await ExpectMsgAsync<DeviceProtocol.ReadResult>()).Value;
    }

    private static bool IsrHas(uint isrWord, byte vector) => (isrWord & (1u << (vector & 31))) != 0;

    [Fact]
    public async Task Icr_write_on_vcpu0_must_inject_the_vector_into_vcpu1_and_reach_its_vlapic_as_accepted()
    {
        var rig = Start(cpus: 2);
        await StartAp(rig, 1);
        rig.Vcpus[0].Supply(EnableApic(), MmioWrite(Lapic + 0x310, 1u << 24), MmioWrite(Lapic + 0x300, 0x40));

        Assert.True(rig.Vcpus[1].WaitUntil(v => v.Injected.Contains((byte)0x40), Wait), "vcpu 1 never got vector 0x40");
        Assert.Empty(rig.Vcpus[0].Injected);
        // InterruptAccepted reached vlapic 1: the vector moved from IRR to ISR.
        await AwaitAssertAsync(async () => Assert.True(IsrHas(await ReadVlapic(rig, 1, 0x100 + (0x40 >> 5) * 0x10), 0x40)),
            Wait);
        Assert.Equal(0u, await ReadVlapic(rig, 1, 0x200 + (0x40 >> 5) * 0x10) & 1u);
    }

    [Fact]
    public void Self_ipi_must_be_injected_into_the_sending_vcpu()
    {
        var rig = Start(cpus: 2);
        // ICR: vector 0x50, fixed, shorthand self (bits 19:18 = 01).
        rig.Vcpus[0].Supply(EnableApic(), MmioWrite(Lapic + 0x300, 0x0004_0050));
        Assert.True(rig.Vcpus[0].WaitUntil(v => v.Injected.Contains((byte)0x50), Wait));
        Assert.Empty(rig.Vcpus[1].Injected);
    }

    [Fact]
    public async Task Broadcast_all_excluding_self_must_reach_the_three_other_vcpus_only()
    {
        var rig = Start(cpus: 4);
        for (var i = 1; i < 4; i++) await StartAp(rig, i);
        rig.Vcpus[0].Supply(EnableApic(), MmioWrite(Lapic + 0x300, 0x000C_0060));
        for (var i = 1; i < 4; i++)
            Assert.True(rig.Vcpus[i].WaitUntil(v => v.Injected.SequenceEqual(new byte[] { 0x60 }), Wait), $"vcpu {i}");
        Assert.True(rig.Vcpus[0].WaitUntilIdleInGuest());
        Assert.Empty(rig.Vcpus[0].Injected);
    }

    [Fact]
    public async Task A_vcpu_an_nmi_wakes_from_a_halt_with_interrupts_disabled_keeps_the_vm_running()
    {
        var rig = Start(cpus: 2);
        // vcpu 1 brought up by INIT-SIPI (so the VM counts it among its started vcpus).
        rig.Vcpus[0].Supply(EnableApic(), MmioWrite(Lapic + 0x310, 1u << 24), MmioWrite(Lapic + 0x300, 0x0000_4500),
            MmioWrite(Lapic + 0x300, 0x0000_4608));
        Assert.True(rig.Vcpus[1].WaitUntilIdleInGuest(Wait), "the AP did not start after SIPI");
        rig.Vcpus[1].InterruptsEnabled = false;
        rig.Vcpus[1].Supply(EnableApic(), VmExit.Hlt.Instance); // cli; hlt: done, unless an NMI comes

        Assert.True(rig.Vcpus[1].WaitUntil(v => v.Consumed == 2 && !v.InRun, Wait));
        rig.Vcpus[0].Supply(MmioWrite(Lapic + 0x300, 0x0000_0400)); // NMI to APIC 1
        Assert.True(rig.Vcpus[1].WaitUntil(v => v.NmisInjected == 1 && v.IdleInGuest, Wait), "the NMI did not wake vcpu 1");

        rig.Vcpus[0].InterruptsEnabled = false;
        rig.Vcpus[0].Supply(VmExit.Hlt.Instance);
        Assert.True(rig.Vcpus[0].WaitUntil(v => !v.InRun && v.Consumed == 6, Wait));
        await Task.Delay(300); // the VM has had VcpuHalted(0) by now: it must not end, vcpu 1 runs
        Assert.False(rig.Ended.IsCompleted, $"the VM ended while vcpu 1 ran: {(rig.Ended.IsCompleted ? rig.Ended.Result : null)}");

        rig.Vcpus[1].Supply(VmExit.Hlt.Instance);
        var outcome = await rig.Ended.WaitAsync(Wait);
        Assert.Equal(VmProtocol.OutcomeKind.Halted, outcome.Kind);
    }

    [Fact]
    public async Task Init_then_sipi_must_start_the_ap_at_the_vector_address_in_real_mode()
    {
        var rig = Start(cpus: 2);
        Assert.Equal(0, rig.Vcpus[1].Runs);
        // INIT (delivery mode 101, level assert), then SIPI vector 0x08 (delivery mode 110), to APIC 1.
        rig.Vcpus[0].Supply(MmioWrite(Lapic + 0x310, 1u << 24), MmioWrite(Lapic + 0x300, 0x0000_4500));
        Assert.True(rig.Vcpus[0].WaitUntilIdleInGuest());
        var vcpu1 = await Child(rig, "vcpu-1");
        await AwaitAssertAsync(async () =>
        {
            vcpu1.Tell(VcpuProtocol.GetStats.Instance);
            Assert.Equal(VcpuProtocol.State.WaitingForSipi, (await ExpectMsgAsync<VcpuProtocol.Stats>()).State);
        }, Wait);
        Assert.Equal(0, rig.Vcpus[1].Runs);

        rig.Vcpus[0].Supply(MmioWrite(Lapic + 0x300, 0x0000_4608));
        Assert.True(rig.Vcpus[1].WaitUntilIdleInGuest(Wait), "the AP did not start after SIPI");
        var cs = rig.Vcpus[1].SpecialRegisters.Cs;
        Assert.Equal(0x8000UL, cs.Base);
        Assert.Equal((ushort)0x0800, cs.Selector);
        Assert.Equal(0UL, rig.Vcpus[1].Registers.Rip);
        Assert.Equal(0UL, rig.Vcpus[1].SpecialRegisters.Cr0 & 1); // real mode

        // The AP runs guest code: its exits are handled.
        rig.Vcpus[1].Supply(Out(0x3F8, (byte)'A'));
        Assert.True(rig.Vcpus[1].WaitUntil(_ => rig.Console.CapturedText() == "A", Wait));
    }

    [Fact]
    public async Task Tpr_must_hold_back_a_lower_class_vector_until_lowered()
    {
        var rig = Start(cpus: 2);
        await StartAp(rig, 1);
        rig.Vcpus[1].Supply(MmioWrite(Lapic + 0x80, 0x50)); // TPR class 5
        Assert.True(rig.Vcpus[1].WaitUntilIdleInGuest());
        rig.Vcpus[0].Supply(EnableApic(), MmioWrite(Lapic + 0x310, 1u << 24), MmioWrite(Lapic + 0x300, 0x45));
        Assert.True(rig.Vcpus[0].WaitUntilIdleInGuest());
        // The vector is in vlapic 1's IRR, not injected.
        await AwaitAssertAsync(async () => Assert.True(IsrHas(await ReadVlapic(rig, 1, 0x200 + (0x45 >> 5) * 0x10), 0x45)), Wait);
        Assert.Empty(rig.Vcpus[1].Injected);

        rig.Vcpus[1].Supply(MmioWrite(Lapic + 0x80, 0x00));
        Assert.True(rig.Vcpus[1].WaitUntil(v => v.Injected.Contains((byte)0x45), Wait));
    }

    /// <summary>IOAPIC redirection entry for <paramref name="pin"/>: fixed, physical destination APIC 0.</summary>
    private static VmExit[] Redirect(int pin, byte vector, bool level) =>
    [
        MmioWrite(IoApicBase, (uint)(0x10 + 2 * pin + 1)), MmioWrite(IoApicBase + 0x10, 0),
        MmioWrite(IoApicBase, (uint)(0x10 + 2 * pin)), MmioWrite(IoApicBase + 0x10, vector | (level ? 1u << 15 : 0)),
    ];

    private static VmExit[] UartInterruptOn() => [Out(0x3FC, 0x08), Out(0x3F9, 0x02)]; // MCR.OUT2, IER: THR empty

    [Fact]
    public void Uart_interrupt_must_travel_through_the_ioapic_and_the_router_to_the_vcpu()
    {
        var rig = Start(cpus: 2);
        rig.Vcpus[0].Supply([EnableApic(), .. Redirect(4, 0x34, level: false), .. UartInterruptOn()]);
        Assert.True(rig.Vcpus[0].WaitUntil(v => v.Injected.Contains((byte)0x34), Wait), "COM1's IRQ 4 never arrived");
        Assert.Empty(rig.Vcpus[1].Injected);
    }

    private async Task<uint> ReadRedirectionLow(IActorRef ioapic, int pin)
    {
        ioapic.Tell(new DeviceProtocol.Write(0, 4, (ulong)(0x10 + 2 * pin)));
        ioapic.Tell(new DeviceProtocol.Read(9, 0x10, 4));
        return (uint)(await FishForMessageAsync<DeviceProtocol.ReadResult>(_ => true)).Value;
    }

    [Fact]
    public async Task Level_triggered_pin_must_keep_remote_irr_until_the_vlapic_eoi()
    {
        const uint remoteIrr = 1u << 14;
        var rig = Start(cpus: 1);
        var ioapic = await Child(rig, PcPlatform.IoApicName);
        rig.Vcpus[0].Supply([EnableApic(), .. Redirect(4, 0x35, level: true), .. UartInterruptOn()]);
        Assert.True(rig.Vcpus[0].WaitUntil(v => v.Injected.Contains((byte)0x35), Wait));
        Assert.NotEqual(0u, await ReadRedirectionLow(ioapic, 4) & remoteIrr);

        // The guest quiets the UART (the read makes sure its line is down), then EOIs the vector.
        rig.Vcpus[0].Supply(Out(0x3F9, 0x00), In(0x3FA));
        Assert.True(rig.Vcpus[0].WaitUntil(v => v.IoInCompletions.Count == 1, Wait));
        Assert.NotEqual(0u, await ReadRedirectionLow(ioapic, 4) & remoteIrr);
        rig.Vcpus[0].Supply(MmioWrite(Lapic + 0xB0, 0));
        await AwaitAssertAsync(async () => Assert.Equal(0u, await ReadRedirectionLow(ioapic, 4) & remoteIrr), Wait);
        Assert.Equal(new byte[] { 0x35 }, rig.Vcpus[0].Injected);
    }

    [Fact]
    public void X2apic_msrs_must_be_answered_by_the_vcpus_vlapic()
    {
        var rig = Start(cpus: 2);
        const ulong x2apic = 0xFEE0_0000 | LocalApic.BaseEnable | LocalApic.BaseExtd;
        rig.Vcpus[0].Supply(
            new VmExit.MsrWrite(ApicMsrs.ApicBase, x2apic, 0),
            new VmExit.MsrRead(0x803, 0),         // version
            new VmExit.MsrWrite(0x808, 0x20, 0),  // TPR
            new VmExit.MsrRead(0x808, 0),
            new VmExit.MsrRead(0x831, 0),         // no ICR high in x2APIC mode: #GP
            new VmExit.MsrRead(ApicMsrs.ApicBase, 0));
        Assert.True(rig.Vcpus[0].WaitUntil(v => v.MsrReadCompletions.Count == 4, Wait));
        Assert.Equal(new[] { false, false }, rig.Vcpus[0].MsrWriteCompletions);
        Assert.Equal(
            new (ulong, bool)[] { (LocalApic.VersionValue, false), (0x20, false), (0, true), (x2apic | LocalApic.BaseBsp, false) },
            rig.Vcpus[0].MsrReadCompletions);
    }

    [Fact]
    public void Other_msrs_must_still_fault()
    {
        var rig = Start(cpus: 1);
        rig.Vcpus[0].Supply(new VmExit.MsrRead(0xC000_0080 + 0x100, 0));
        Assert.True(rig.Vcpus[0].WaitUntil(v => v.MsrReadCompletions.Count == 1, Wait));
        Assert.Equal((0UL, true), rig.Vcpus[0].MsrReadCompletions[0]);
    }

    [Fact]
    public void Pic_irq_must_reach_the_bsp_through_lint0_and_inta()
    {
        var rig = Start(cpus: 1);
        // Unmask IRQ 4 on the master (BIOS-like PIC: vector base 0x08), raise COM1's interrupt.
        rig.Vcpus[0].Supply([Out(0x21, 0b1110_1111), .. UartInterruptOn()]);
        Assert.True(rig.Vcpus[0].WaitUntil(v => v.Injected.Contains((byte)(0x08 + 4)), Wait), "no ExtINT vector from the PIC");
    }

    [Fact]
    public async Task Pic_must_own_its_three_port_ranges_in_one_actor()
    {
        var rig = Start(cpus: 1);
        // OCW1 on the slave's data port, read back through the bus: the slave window, not the master's.
        rig.Vcpus[0].Supply(Out(0xA1, 0x5A), In(0xA1), In(0x21), Out(0x4D0, 0xF8), In(0x4D0));
        Assert.True(rig.Vcpus[0].WaitUntil(v => v.IoInCompletions.Count == 3, Wait));
        Assert.Equal(new (int, ulong)[] { (0, 0x5A), (0, 0xFF), (0, 0xF8) }, rig.Vcpus[0].IoInCompletions);
        var pic = await Child(rig, PcPlatform.PicName);
        pic.Tell(DeviceProtocol.GetStats.Instance);
        Assert.Equal(3, (await ExpectMsgAsync<DeviceProtocol.Stats>()).Reads);
    }

    /// <summary>The PC interrupt platform and QEMU's pc-testdev (its line block at 0x2000), with the
    /// line changes from pc-testdev to <paramref name="slowController"/> held back on the way for 100 ms
    /// (a busy controller), so that an OUT that returned before the change took effect would show.</summary>
    private ScriptedVm StartWithTestDevice(string slowController)
    {
        var faults = new LinkFaultPlan();
        faults.Add(new LinkFault(PcPlatform.TestDeviceName, slowController, nameof(DeviceProtocol.SetIrqLevel), LinkFaultKind.Delay,
            TimeSpan.FromMilliseconds(100)));
        return Vms.Start(1, extra: [PcPlatform.TestDevice()], interruptPlatform: true, faults: faults,
            lapic: LapicBackends.Emulated(new LapicOptions { BspLint0ExtInt = true }));
    }

    /// <summary>
    /// An OUT to pc-testdev's line block completes only once the change has reached the controllers
    /// and the interrupt is pending at the vcpu (as on QEMU, where the OUT returns after
    /// qemu_set_irq), however long the controller takes: the vector goes in at the very next entry,
    /// with no kick in between.
    /// </summary>
    [Fact]
    public void An_out_to_the_test_devices_line_block_returns_with_the_ioapic_interrupt_pending()
    {
        var rig = StartWithTestDevice(PcPlatform.IoApicName);
        var vcpu = rig.Vcpus[0];
        vcpu.Supply([EnableApic(), .. Redirect(14, 0x3E, level: false)]);
        Assert.True(vcpu.WaitUntilIdleInGuest(Wait));
        var (consumed, kicks) = (vcpu.Consumed, vcpu.IntrReturned);

        vcpu.Supply(Out(0x2000 + 14, 1));

        Assert.True(vcpu.WaitUntil(v => v.Injected.Count > 0, Wait), "line 14 never reached the vcpu");
        Assert.Equal(new[] { ((byte)0x3E, consumed + 1, kicks) }, vcpu.InjectedAt);
    }

    /// <summary>The same through the 8259 (ExtINT on LINT0, then INTA): IRQ 11 raised by the real-mode
    /// suite's 32-bit OUT to port 0x200B, with IRQ 2 and IRQ 11 unmasked (slave vector base 0x70).</summary>
    [Fact]
    public void An_out_to_the_test_devices_line_block_returns_with_the_pic_interrupt_pending()
    {
        var rig = StartWithTestDevice(PcPlatform.PicName);
        var vcpu = rig.Vcpus[0];
        vcpu.Supply(Out(0x21, 0b1111_1011), Out(0xA1, 0b1111_0111));
        Assert.True(vcpu.WaitUntilIdleInGuest(Wait));
        var (consumed, kicks) = (vcpu.Consumed, vcpu.IntrReturned);

        vcpu.Supply(new VmExit.Io(true, 0x200B, 4, 1, 1, null));

        Assert.True(vcpu.WaitUntil(v => v.Injected.Count > 0, Wait), "IRQ 11 never reached the vcpu");
        Assert.Equal(new[] { ((byte)0x73, consumed + 1, kicks) }, vcpu.InjectedAt);
    }
}
