using System.Text;
using ActorVmm.Host.Boot;
using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Host.Guests;

/// <summary>
/// The built-in guest of `actorvmm demo`: 64-bit code (the VMM builds its page tables) that prints
/// a greeting on COM1 the way a driver does — poll LSR until THRE, then write THR — then takes one
/// interrupt from the UART: it routes IOAPIC pin 4 to <see cref="UartVector"/>, enables the
/// transmitter-empty interrupt (IER.ETBEI, with MCR.OUT2 gating the IRQ onto the bus) and sleeps in
/// HLT. The handler reads IIR (which clears it), turns the interrupt off, and EOIs its local APIC.
/// The guest prints a second line and halts with interrupts disabled: exit code 0. Its trace shows
/// both paths: vcpu exit → UART, and UART → IOAPIC → APIC router → vlapic → vcpu.
/// </summary>
public static class DemoGuest
{
    public const ulong LoadAddress = 0x10_0000;
    public const string Greeting = "Hello from an ActorVmm guest!\n";
    public const string AfterInterrupt = "The UART interrupted me: IRQ 4 -> IOAPIC -> local APIC -> vector 0x24.\n";
    public const byte UartVector = 0x24;
    private const ulong Flag = 0x9F900;

    public static LongModeImage Build(string greeting = Greeting)
    {
        var a = new Assembler(64);
        var first = a.CreateLabel();
        var second = a.CreateLabel();
        var handler = a.CreateLabel();
        var wait = a.CreateLabel();
        var hlt = a.CreateLabel();

        InterruptCode.SetGate(a, UartVector, handler);
        InterruptCode.EnableLocalApic(a);
        InterruptCode.RouteIoApicPin(a, 4, UartVector);

        a.lea(rsi, __[first]);
        Print(a);

        a.mov(dx, 0x3FC);          // MCR: OUT2 (the UART's IRQ reaches the interrupt controllers)
        a.mov(al, 0x08);
        a.@out(dx, al);
        a.mov(dx, 0x3F9);          // IER: interrupt when the transmitter is empty (it is: at once)
        a.mov(al, 0x02);
        a.@out(dx, al);
        a.mov(rdi, (long)Flag);
        a.Label(ref wait);
        InterruptCode.SleepWithInterruptsOn(a, hlt);
        a.cli();
        a.cmp(__byte_ptr[rdi], 1);
        a.jne(wait);

        a.lea(rsi, __[second]);
        Print(a);
        a.cli();
        a.hlt();

        a.Label(ref handler);
        InterruptCode.ReturnPastInterruptedHlt(a, hlt);
        a.push(rax);
        a.push(rdx);
        a.push(rdi);
        a.mov(dx, 0x3FA);          // IIR: reading it clears the transmitter-empty interrupt
        a.@in(al, dx);
        a.mov(dx, 0x3F9);          // IER: no more interrupts
        a.xor(al, al);
        a.@out(dx, al);
        a.mov(rdi, (long)Flag);
        a.mov(__byte_ptr[rdi], 1);
        InterruptCode.Eoi(a);
        a.pop(rdi);
        a.pop(rdx);
        a.pop(rax);
        a.iretq();

        a.Label(ref first);
        a.db([.. Encoding.ASCII.GetBytes(greeting), 0]);
        a.Label(ref second);
        a.db([.. Encoding.ASCII.GetBytes(AfterInterrupt), 0]);

        return new LongModeImage(GuestCode.Assemble(a, LoadAddress), LoadAddress, LoadAddress);
    }

    /// <summary>Prints the zero-terminated string at RSI on COM1, polling LSR.THRE before each byte.</summary>
    private static void Print(Assembler a)
    {
        var next = a.CreateLabel();
        var wait = a.CreateLabel();
        var done = a.CreateLabel();
        a.Label(ref next);
        a.mov(bl, __byte_ptr[rsi]);
        a.test(bl, bl);
        a.jz(done);
        a.Label(ref wait);
        a.mov(dx, 0x3FD);          // LSR
        a.@in(al, dx);
        a.test(al, 0x20);          // THRE
        a.jz(wait);
        a.mov(dx, 0x3F8);          // THR
        a.mov(al, bl);
        a.@out(dx, al);
        a.inc(rsi);
        a.jmp(next);
        a.Label(ref done);
    }
}
