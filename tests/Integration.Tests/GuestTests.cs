using System.Text;
using ActorVmm.Devices;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>Real guests on real KVM, checked by what they did: serial output, exit status, memory.</summary>
public sealed class GuestTests
{
    private const ulong Code = 0x10_0000;
    private const ulong Results = 0x20_0000;

    private static LongModeImage Long(Action<Assembler> body)
    {
        var a = new Assembler(64);
        body(a);
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }

    /// <summary>Busy-waits for THRE, then writes AL to COM1 (clobbers DX, AH).</summary>
    private static void Putc(Assembler a, char c)
    {
        var wait = a.CreateLabel();
        a.mov(ah, (byte)c);
        a.Label(ref wait);
        a.mov(dx, 0x3FD);
        a.@in(al, dx);
        a.test(al, 0x20);
        a.jz(wait);
        a.mov(dx, 0x3F8);
        a.mov(al, ah);
        a.@out(dx, al);
    }

    private static void Halt(Assembler a)
    {
        a.cli();
        a.hlt();
    }

    [KvmFact]
    public async Task Serial_hello_reaches_the_console_and_the_guest_halts()
    {
        await using var run = await GuestRun.RunAsync(DemoGuest.Build("hello\n"));
        Assert.Equal("hello\n" + DemoGuest.AfterInterrupt, run.Serial);
        Assert.Equal(VmProtocol.OutcomeKind.Halted, run.Outcome.Kind);
        Assert.Equal(0, run.Outcome.ExitCode);
    }

    [KvmFact]
    public async Task Ten_thousand_outs_are_counted_by_a_test_device()
    {
        var counter = new CountingDevice();
        var image = Long(a =>
        {
            var loop = a.CreateLabel();
            a.mov(ecx, 10_000);
            a.mov(al, 1);
            a.Label(ref loop);
            a.@out(0x10, al);
            a.dec(ecx);
            a.jnz(loop);
            a.mov(al, 0);
            a.@out(0xF4, al);
        });
        await using var run = await GuestRun.RunAsync(image, devices:
            new DeviceSpec("counter", DeviceProtocol.Space.Port, 0x10, 1, _ => counter));
        Assert.Equal(VmProtocol.OutcomeKind.DebugExit, run.Outcome.Kind);
        Assert.Equal(1, run.Outcome.ExitCode);
        Assert.Equal(10_000, counter.Writes);
        Assert.Equal(10_000, counter.Sum);
    }

    [KvmFact]
    public async Task Ins_return_the_values_the_device_gives()
    {
        var image = Long(a =>
        {
            a.mov(rdi, Results);
            for (var i = 0; i < 4; i++)
            {
                a.mov(dx, 0x300); // a free ISA range (0x20 is the 8259's)
                a.@in(eax, dx);
                a.mov(__dword_ptr[rdi + i * 4], eax);
            }
            Halt(a);
        });
        await using var run = await GuestRun.RunAsync(image, devices:
            new DeviceSpec("values", DeviceProtocol.Space.Port, 0x300, 4, _ => new RegisterDevice(0xC0DE_0000)));
        Assert.Equal(VmProtocol.OutcomeKind.Halted, run.Outcome.Kind);
        var memory = new byte[16];
        run.Vm.Memory.Read(new GuestPhysAddr(Results), memory);
        for (var i = 0; i < 4; i++)
            Assert.Equal(0xC0DE_0000u + (uint)i, BitConverter.ToUInt32(memory, i * 4));
    }

    [KvmFact]
    public async Task Mmio_writes_reach_the_device_and_reads_come_back()
    {
        const ulong mmioBase = 0xD000_0000;
        var device = new RegisterDevice(0x5A);
        var image = Long(a =>
        {
            a.mov(rbx, mmioBase);
            a.mov(__dword_ptr[rbx + 8], 0x1234_5678);       // MMIO write, 4 bytes at offset 8
            a.mov(eax, __dword_ptr[rbx + 8]);               // read back through the device
            a.mov(rdi, Results);
            a.mov(__dword_ptr[rdi], eax);
            a.mov(al, __byte_ptr[rbx + 0x10]);              // unwritten register: the device's counter value
            a.mov(__byte_ptr[rdi + 4], al);
            a.mov(rax, 0xE000_0000);                        // unassigned MMIO: all ones
            a.mov(eax, __dword_ptr[rax]);
            a.mov(__dword_ptr[rdi + 8], eax);
            Halt(a);
        });
        await using var run = await GuestRun.RunAsync(image, devices:
            new DeviceSpec("regs", DeviceProtocol.Space.Mmio, mmioBase, 0x1000, _ => device));
        Assert.Equal(VmProtocol.OutcomeKind.Halted, run.Outcome.Kind);
        Assert.Equal(0x1234_5678UL, device.Registers[8]);
        var memory = new byte[12];
        run.Vm.Memory.Read(new GuestPhysAddr(Results), memory);
        Assert.Equal(0x1234_5678u, BitConverter.ToUInt32(memory, 0));
        Assert.Equal(0x5A, memory[4]);
        Assert.Equal(0xFFFF_FFFFu, BitConverter.ToUInt32(memory, 8));
    }

    [KvmFact]
    public async Task Unassigned_ports_read_all_ones_and_never_stop_the_guest()
    {
        var image = Long(a =>
        {
            a.mov(rdi, Results);
            a.mov(dx, 0x2F0);
            a.@in(al, dx);
            a.mov(__byte_ptr[rdi], al);
            a.@in(ax, dx);
            a.mov(__word_ptr[rdi + 2], ax);
            a.mov(al, 0x55);
            a.@out(dx, al);  // dropped
            Halt(a);
        });
        await using var run = await GuestRun.RunAsync(image);
        Assert.Equal(VmProtocol.OutcomeKind.Halted, run.Outcome.Kind);
        var memory = new byte[4];
        run.Vm.Memory.Read(new GuestPhysAddr(Results), memory);
        Assert.Equal(0xFF, memory[0]);
        Assert.Equal(0xFFFF, BitConverter.ToUInt16(memory, 2));
    }

    [KvmFact]
    public async Task Hlt_with_interrupts_disabled_ends_the_vm_with_code_zero()
    {
        var image = Long(a =>
        {
            a.mov(rdi, Results);
            a.mov(__dword_ptr[rdi], 0xAB);
            Halt(a);
            a.mov(__dword_ptr[rdi], 0xCD); // never reached
        });
        await using var run = await GuestRun.RunAsync(image);
        Assert.Equal(VmProtocol.OutcomeKind.Halted, run.Outcome.Kind);
        Assert.Equal(0, run.Outcome.ExitCode);
        Assert.Equal(0xABUL, run.Vm.Memory.ReadUInt64(new GuestPhysAddr(Results)));
    }

    [KvmFact]
    public async Task Debug_exit_codes_follow_the_qemu_convention()
    {
        foreach (var (value, status) in new[] { (0, 1), (1, 3), (5, 11) })
        {
            var image = Long(a =>
            {
                a.mov(al, (byte)value);
                a.@out(0xF4, al);
                Halt(a);
            });
            await using var run = await GuestRun.RunAsync(image);
            Assert.Equal(VmProtocol.OutcomeKind.DebugExit, run.Outcome.Kind);
            Assert.Equal(status, run.Outcome.ExitCode);
        }
    }

    [KvmFact]
    public async Task I8042_reset_command_ends_the_vm_as_a_reset()
    {
        var image = Long(a =>
        {
            a.mov(al, 0xFE);
            a.@out(0x64, al);
            a.jmp(Code + 0); // spin until stopped (never reaches HLT)
        });
        await using var run = await GuestRun.RunAsync(image);
        Assert.Equal(VmProtocol.OutcomeKind.Reset, run.Outcome.Kind);
        Assert.Equal(VmProtocol.Outcome.ResetCode, run.Outcome.ExitCode);
    }

    [KvmFact]
    public async Task An_instruction_kvm_cannot_emulate_stops_the_vm_with_a_clear_report()
    {
        // KVM's emulator has no x87 loads: an fld from MMIO space cannot be emulated on any host.
        var image = Long(a =>
        {
            a.mov(rax, 0xD000_0000);
            a.fld(__qword_ptr[rax]);
            Halt(a);
        });
        await using var run = await GuestRun.RunAsync(image);
        Assert.Equal(VmProtocol.OutcomeKind.VcpuError, run.Outcome.Kind);
        Assert.Equal(VmProtocol.Outcome.VcpuErrorCode, run.Outcome.ExitCode);
        Assert.Contains("vcpu 0", run.Outcome.Detail);
        Assert.Contains("RIP", run.Outcome.Detail);
        Assert.Contains("fld", run.Outcome.Detail);
        Assert.Contains("bytes at RIP", run.Outcome.Detail);
    }

    [KvmFact]
    public async Task A_real_mode_flat_binary_prints_and_halts()
    {
        var a = new Assembler(16);
        foreach (var c in "RM\n")
        {
            a.mov(dx, 0x3F8);
            a.mov(al, (byte)c);
            a.@out(dx, al);
        }
        a.cli();
        a.hlt();
        var image = new FlatImage(GuestCode.Assemble(a, 0x7C00), 0x7C00, 0, 0x7C00);
        await using var run = await GuestRun.RunAsync(image);
        Assert.Equal("RM\n", run.Serial);
        Assert.Equal(VmProtocol.OutcomeKind.Halted, run.Outcome.Kind);
    }

    [KvmFact]
    public async Task Firmware_starts_at_the_reset_vector()
    {
        // A 4 KiB image at 0xFFFFF000: code at its start (CS base 0xFFFF0000 → IP 0xF000),
        // a near jump at the reset vector (IP 0xFFF0) back to it.
        var image = new byte[4096];
        var a = new Assembler(16);
        foreach (var c in "FW\n")
        {
            a.mov(dx, 0x3F8);
            a.mov(al, (byte)c);
            a.@out(dx, al);
        }
        a.mov(al, 2);
        a.@out(0xF4, al);
        var code = GuestCode.Assemble(a, 0xF000);
        code.CopyTo(image, 0);
        var jump = new Assembler(16);
        jump.jmp(0xF000UL);
        var jmp = GuestCode.Assemble(jump, 0xFFF0);
        jmp.CopyTo(image, 4096 - 16);

        await using var run = await GuestRun.RunAsync(new FirmwareImage(image));
        Assert.Equal("FW\n", run.Serial);
        Assert.Equal(VmProtocol.OutcomeKind.DebugExit, run.Outcome.Kind);
        Assert.Equal(5, run.Outcome.ExitCode);
    }

    [KvmFact]
    public async Task The_trace_shows_the_exit_to_device_chain()
    {
        await using var run = await GuestRun.RunAsync(DemoGuest.Build("A"));
        var events = run.Trace.Snapshot();
        Assert.Contains(events, e => e.Sender == "vcpu-0" && e.Receiver == "uart0" && e.Message is DeviceProtocol.Read);
        Assert.Contains(events, e => e.Sender == "uart0" && e.Receiver == "vcpu-0" && e.Message is DeviceProtocol.ReadResult);
        Assert.Contains(events, e => e.Sender == "vcpu-0" && e.Receiver == "uart0" &&
                                     e.Message is DeviceProtocol.Write { Offset: 0, Value: (byte)'A' });
        Assert.Contains(events, e => e.Message is ActorVmm.Vcpu.VcpuProtocol.VcpuHalted);
    }
}
